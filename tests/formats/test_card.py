"""The dataset card: Hub-convention YAML metadata, prose without Python reprs, a target figure."""

from __future__ import annotations

import json
import re

import matplotlib.image
import numpy as np
import pytest
import yaml

from kdcache.formats import card as card_module
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.synthetic import synthetic_window
from kdcache.formats.writer import DatasetWriter

pytestmark = pytest.mark.timeout(300)

# Stats as a dump records them: nested, with nulls, booleans, lists and floats.
_STATS = {"corpus": {"files": 3, "skipped": None, "resumed": True, "paths": ["a.txt", "b.txt"],
                     "rate": 1234.5},
          "packing": {"dropped": 0, "split": False}}


def _write(root, *, kind="topk", mode="document", windows=3, no_valid=False, stats=_STATS):
    header = DatasetHeader(
        kind=kind, k=8, vocab_size=1000, codec="qrank",
        packing={"window": 64, "mode": mode, "bos_id": 1, "eos_id": 2, "seed": 0,
                 "split_long_docs": True, "shuffle_buffer": None},
        teacher={"name": "tiny-llama", "path": "/models/tiny-llama", "architecture":
                 "LlamaForCausalLM", "vocab_size": 1000, "config_hash": "c0ffee",
                 "tokenizer_hash": "beef"},
        extra={"license": "apache-2.0"})
    rng = np.random.default_rng(0)
    writer = DatasetWriter(root, header, windows_per_shard=2)
    for i in range(windows):
        rec = synthetic_window(rng, i, 64, 1000, 8, mode=mode, kind=kind, doc_len=(4, 40))
        if no_valid:
            rec.valid[:] = False
        writer.add(rec)
    writer.close(stats=stats)
    return json.loads((root / "manifest.json").read_text()), (root / "README.md").read_text()


def _front_matter(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "the card must open with a YAML block between --- lines"
    return yaml.safe_load(match.group(1))


def test_card_metadata_block_follows_the_hub_convention(tmp_path):
    manifest, text = _write(tmp_path / "ds")
    meta = _front_matter(text)
    assert meta["license"] == "apache-2.0"
    assert "knowledge-distillation" in meta["tags"] and meta["size_categories"] == ["n<1K"]
    assert meta["teacher"]["name"] == "tiny-llama"
    assert meta["teacher"]["architecture"] == "LlamaForCausalLM"
    assert meta["tokenizer"] == {"source": "/models/tiny-llama", "hash": "beef"}
    assert (meta["kind"], meta["k"], meta["vocab_size"]) == ("topk", 8, 1000)
    assert meta["packing"] == {"mode": "document", "window": 64}
    totals = manifest["totals"]
    assert (meta["tokens"], meta["bytes"], meta["windows"]) == \
        (totals["tokens"], totals["bytes"], totals["windows"])
    assert meta["format_version"] == manifest["format_version"]
    body = text.split("\n---\n", 1)[1]
    assert "# kdcache logit dataset: tiny-llama" in body and "open_dataset" in body


def test_card_has_no_python_reprs(tmp_path):
    _, text = _write(tmp_path / "ds")
    # Python's spellings of dicts, lists, None and booleans; JSON/YAML spell them otherwise.
    for repr_mark in ("{'", "['", "': ", "None", "True", "False", "array(", "dtype("):
        assert repr_mark not in text, f"card holds a Python repr ({repr_mark!r})"
    assert "| corpus.skipped | `null` |" in text
    assert "| corpus.paths | `[\"a.txt\", \"b.txt\"]` |" in text
    assert "| split_long_docs | `true` |" in text


@pytest.mark.parametrize("kind,mode", [("topk", "document"), ("sampled", "causal")])
def test_card_figure_is_written_and_linked(tmp_path, kind, mode):
    _, text = _write(tmp_path / "ds", kind=kind, mode=mode)
    png = tmp_path / "ds" / card_module.FIGURE_PATH
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.shape[0] >= 600 and image.shape[1] >= 900  # legible, not a thumbnail
    assert f"]({card_module.FIGURE_PATH})" in text
    assert re.search(r"[\d,]+ rows from 3 windows", text)


def test_sampled_rows_and_positions(tmp_path):
    from kdcache.formats.card_figure import sample_targets
    from kdcache.formats.reader import open_dataset

    manifest, _ = _write(tmp_path / "ds", mode="document")
    sample = sample_targets(str(tmp_path / "ds"), manifest)
    ds = open_dataset(tmp_path / "ds")
    windows = [ds[i] for i in range(len(ds))]
    assert sample.windows == 3 and sample.rows == sum(int(w.valid.sum()) for w in windows)
    p = np.exp(windows[0].logprobs.numpy()[windows[0].valid.numpy()].astype(np.float64))
    n0 = p.shape[0]
    assert np.allclose(sample.top1[:n0], p.max(axis=1))
    assert np.allclose(sample.entropy[:n0], -(p * np.log(p)).sum(axis=1))
    # Document mode: positions restart in every document (1 = the document's first token).
    offsets = windows[0].doc_offsets.numpy()
    valid = windows[0].valid.numpy()
    rows = np.flatnonzero(valid)
    expected = rows - offsets[np.searchsorted(offsets, rows, side="right") - 1] + 1
    assert np.array_equal(sample.position[:n0], expected)


def test_card_without_valid_rows_says_so(tmp_path):
    _, text = _write(tmp_path / "ds", windows=2, no_valid=True)
    assert "No figure: the sampled windows hold no valid rows." in text
    assert not (tmp_path / "ds" / card_module.FIGURE_PATH).exists()


def test_a_figure_that_fails_does_not_lose_the_dataset(tmp_path, monkeypatch, caplog):
    import kdcache.formats.card_figure as figure

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(figure, "render_figure", broken)
    manifest, text = _write(tmp_path / "ds")
    assert (tmp_path / "ds" / "manifest.json").exists()
    assert "No figure: drawing it failed (RuntimeError)." in text
    assert "card figure not drawn" in caplog.text
