"""Writer -> reader round trips: every field comes back as written, on local paths and fsspec URLs."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from kdcache.errors import FormatError
from kdcache.formats.manifest import FORMAT_VERSION, DatasetHeader
from kdcache.formats.reader import open_dataset
from kdcache.formats.synthetic import synthetic_window
from kdcache.formats.packing import default_valid
from kdcache.formats.verify import verify_dataset
from kdcache.formats.writer import DatasetWriter


def _header(kind="topk", k=8, vocab=1000, mode="document", window=64, codec="raw"):
    return DatasetHeader(kind=kind, k=k, vocab_size=vocab, codec=codec,
                         packing={"window": window, "mode": mode, "bos_id": 1, "eos_id": 2},
                         teacher={"name": "unit-test"})


def _write(root, header, n_windows=5, n=64, seed=0, per_shard=2):
    rng = np.random.default_rng(seed)
    recs = [synthetic_window(rng, i, n, header.vocab_size, header.k, mode=header.packing["mode"],
                             kind=header.kind, doc_len=(4, 24)) for i in range(n_windows)]
    with DatasetWriter(root, header, windows_per_shard=per_shard) as w:
        for r in recs:
            w.add(r)
    return recs


@pytest.mark.parametrize("kind", ["topk", "sampled"])
@pytest.mark.parametrize("mode", ["causal", "document", "document-global"])
def test_roundtrip_every_field(tmp_path, kind, mode):
    header = _header(kind=kind, mode=mode)
    recs = _write(tmp_path / "ds", header)
    ds = open_dataset(tmp_path / "ds")
    assert len(ds) == len(recs)
    for rec, w in zip(recs, ds.iter_windows()):
        assert w.window_index == rec.window_index
        assert w.tokens.dtype == torch.int32 and w.ids.dtype == torch.int32
        assert torch.equal(w.tokens, torch.as_tensor(rec.tokens, dtype=torch.int32))
        assert torch.equal(w.doc_offsets, torch.as_tensor(rec.doc_offsets, dtype=torch.int32))
        assert torch.equal(w.valid, torch.as_tensor(rec.valid))
        assert torch.equal(w.doc_ids, torch.as_tensor(rec.doc_ids))
        v = rec.valid
        assert np.array_equal(w.ids.numpy()[v], rec.ids[v])
        assert (w.ids.numpy()[~v] == -1).all()
        values = w.logprobs if kind == "topk" else w.weights
        assert values.dtype == torch.float32
        assert np.array_equal(values.numpy()[v], rec.values[v])  # raw codec is lossless
        fill = -np.inf if kind == "topk" else 0.0
        assert (values.numpy()[~v] == fill).all()
        assert (w.logprobs is None) == (kind == "sampled")
    report = verify_dataset(tmp_path / "ds")
    assert report.ok, report.problems
    assert report.windows_checked == len(recs)


def test_row_semantics_valid_flags():
    offsets = np.array([0, 3, 7, 10])
    assert default_valid(10, offsets, "causal").tolist() == [True] * 9 + [False]
    doc = default_valid(10, offsets, "document")
    assert np.flatnonzero(~doc).tolist() == [2, 6, 9]
    assert np.array_equal(doc, default_valid(10, offsets, "document-global"))
    with pytest.raises(ValueError):
        default_valid(10, offsets, "bogus")


@pytest.mark.parametrize("vocab,expected", [(200, pa.uint8()), (256, pa.uint8()),
                                            (257, pa.uint16()), (65_536, pa.uint16()),
                                            (65_537, pa.uint32()), (202_048, pa.uint32()),
                                            (2**31 - 1, pa.uint32())])
def test_token_ids_stored_in_narrowest_unsigned_type(tmp_path, vocab, expected):
    header = _header(vocab=vocab, k=4)
    _write(tmp_path / "ds", header, n_windows=1)
    ds = open_dataset(tmp_path / "ds")
    assert ds.shard(0)._file.schema.field("tokens").type.value_type == expected
    w = ds[0]
    assert int(w.ids.max()) < vocab and w.ids.dtype == torch.int32


def test_fsspec_memory_url_roundtrip():
    header = _header()
    url = "memory://kdcache-test/ds-roundtrip"
    recs = _write(url, header, n_windows=3)
    ds = open_dataset(url)
    assert [w.window_index for w in ds.iter_windows()] == [r.window_index for r in recs]
    assert verify_dataset(url).ok


def test_manifest_schema_and_card(tmp_path):
    _write(tmp_path / "ds", _header(), n_windows=3, per_shard=2)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["format"] == "kdcache-logits" and manifest["format_version"] == FORMAT_VERSION
    assert manifest["targets"] == {"kind": "topk", "k": 8, "vocab_size": 1000, "temperature": 1.0,
                                   "normalization": "full-vocabulary log-probs"}
    assert manifest["packing"]["mode"] == "document"
    assert [s["name"] for s in manifest["shards"]] == ["shards/shard-00000.arrow",
                                                       "shards/shard-00001.arrow"]
    for s in manifest["shards"]:
        assert (tmp_path / "ds" / s["name"]).stat().st_size == s["bytes"]
        assert len(s["xxh3"]) == 16
    assert manifest["totals"]["windows"] == 3 and manifest["totals"]["tokens"] == 3 * 64
    card = (tmp_path / "ds" / "README.md").read_text()
    assert "open_dataset" in card and "document" in card and "unit-test" in card


def test_writer_refuses_to_mix_into_finished_dataset(tmp_path):
    _write(tmp_path / "ds", _header(), n_windows=1)
    with pytest.raises(FormatError, match="already holds a finished dataset"):
        DatasetWriter(tmp_path / "ds", _header())


def test_unfinished_dataset_is_refused(tmp_path):
    (tmp_path / "ds" / "shards").mkdir(parents=True)
    with pytest.raises(FormatError, match="manifest.json: missing"):
        open_dataset(tmp_path / "ds")
