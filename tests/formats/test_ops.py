"""Dataset operations (subset, merge, reshard, reencode): each output is a verified dataset whose
manifest and card record its lineage; copies are bit for bit, re-encodes are measured."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kdcache.cli import main as cli_main
from kdcache.errors import ConfigMismatchError
from kdcache.formats import ops
from kdcache.formats.manifest import MANIFEST_NAME
from kdcache.formats.reader import open_dataset
from kdcache.formats.synthetic import write_synthetic_dataset

SYNTH = dict(window=256, vocab_size=4000, k=16, windows_per_shard=2, doc_len=(16, 128))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    a, b = str(root / "a"), str(root / "b")
    write_synthetic_dataset(a, windows=6, seed=0, **SYNTH)
    write_synthetic_dataset(b, windows=4, seed=1, **SYNTH)
    return a, b


def _raw(path: str) -> list[dict]:
    """Every window's stored fields, targets as bytes (what a copy must keep bit for bit)."""
    ds = open_dataset(path)
    out = []
    for i in range(len(ds)):
        s, j = ds.locate(i)
        f = ds.shard(s).fields(j)
        f["targets"] = bytes(f["targets"])
        out.append(f)
    return out


def _same_window(x: dict, y: dict) -> None:
    for key in ("tokens", "doc_offsets", "doc_ids", "doc_pieces", "valid"):
        np.testing.assert_array_equal(x[key], y[key])
    assert x["targets"] == y["targets"]


def _decoded(path: str) -> list:
    ds = open_dataset(path)
    return [ds[i] for i in range(len(ds))]


def _same_distributions(a, b) -> None:
    """Same ids per row (a re-encode may order equal log-probs differently) and values."""
    v = a.valid.numpy()
    ia, ib = a.ids.numpy()[v], b.ids.numpy()[v]
    la, lb = a.logprobs.numpy()[v], b.logprobs.numpy()[v]
    oa, ob = np.argsort(ia, axis=1), np.argsort(ib, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(ia, oa, 1), np.take_along_axis(ib, ob, 1))
    np.testing.assert_array_equal(np.take_along_axis(la, oa, 1), np.take_along_axis(lb, ob, 1))


def test_subset_by_windows_copies_bit_for_bit_and_records_lineage(sources, tmp_path):
    a, _ = sources
    out = str(tmp_path / "sub")
    result = ops.subset(a, out, windows="1:3,5")
    assert result.verified and result.targets == "copied" and result.windows == 3
    src, got = _raw(a), _raw(out)
    for x, y in zip([src[1], src[2], src[5]], got):
        _same_window(x, y)
    assert [f["window_index"] for f in got] == [0, 1, 2]
    manifest = open_dataset(out).manifest
    step = manifest["extra"]["lineage"][-1]
    assert step["operation"] == "subset" and step["params"]["source_windows"] == "1:3,5:6"
    import xxhash
    with open(os.path.join(a, MANIFEST_NAME), "rb") as fh:
        assert step["sources"][0]["manifest_xxh3"] == xxhash.xxh3_64(fh.read()).hexdigest()
    card = open(os.path.join(out, "README.md")).read()
    assert "## Lineage" in card and step["sources"][0]["manifest_xxh3"] in card


def test_subset_by_documents_keeps_whole_windows(sources, tmp_path):
    a, _ = sources
    src = _raw(a)
    wanted = {int(src[2]["doc_ids"][1]), int(src[4]["doc_ids"][0])}
    out = str(tmp_path / "docs")
    result = ops.subset(a, out, documents=",".join(map(str, sorted(wanted))))
    got = _raw(out)
    assert result.windows == len(got) == 2
    _same_window(src[2], got[0])
    _same_window(src[4], got[1])


def test_subset_refuses_bad_selections_before_writing(sources, tmp_path):
    a, _ = sources
    out = tmp_path / "bad"
    for kw, msg in (({"windows": "4:9"}, "past the last"), ({"windows": "x"}, "cannot read"),
                    ({}, "give --windows"), ({"documents": "999999999"}, "no window holds")):
        with pytest.raises(ops.OperationError, match=msg):
            ops.subset(a, str(out), **kw)
        assert not out.exists()
    with pytest.raises(ops.OperationError, match="is a source"):
        ops.subset(a, a + "/", windows="0")


def test_reshard_changes_only_the_shards(sources, tmp_path):
    a, _ = sources
    out = str(tmp_path / "rs")
    result = ops.reshard(a, out, windows_per_shard=4)
    assert result.shards == 2 and open_dataset(a).manifest["totals"]["shards"] == 3
    for x, y in zip(_raw(a), _raw(out)):
        _same_window(x, y)


def test_merge_concatenates_and_chains_lineage(sources, tmp_path):
    a, b = sources
    out = str(tmp_path / "m")
    result = ops.merge([a, b], out)
    # b's qrank table was fitted on b's own first window: its windows are encoded again with a's
    assert result.targets == "mixed" and result.windows == 10
    merged = _decoded(out)
    for x, y in zip(_raw(a), _raw(out)[:6]):
        _same_window(x, y)
    for x, y in zip(_decoded(b), merged[6:]):
        _same_distributions(x, y)
    assert [w.window_index for w in merged] == list(range(10))
    twice = str(tmp_path / "m-sub")
    ops.subset(out, twice, windows="5:8")
    lineage = open_dataset(twice).manifest["extra"]["lineage"]
    assert [s["operation"] for s in lineage] == ["merge", "subset"]
    assert [s["path"] for s in lineage[0]["sources"]] == [a, b]


def test_merge_of_raw_datasets_copies_everything(tmp_path):
    a, b = str(tmp_path / "ra"), str(tmp_path / "rb")
    write_synthetic_dataset(a, windows=2, seed=3, codec="raw", **SYNTH)
    write_synthetic_dataset(b, windows=2, seed=4, codec="raw", **SYNTH)
    result = ops.merge([a, b], str(tmp_path / "rm"))
    assert result.targets == "copied"
    for x, y in zip(_raw(a) + _raw(b), _raw(str(tmp_path / "rm"))):
        _same_window(x, y)


def test_merge_refuses_other_teacher_or_packing(sources, tmp_path):
    a, _ = sources
    other = str(tmp_path / "other-window")
    write_synthetic_dataset(other, windows=2, seed=5, **dict(SYNTH, window=128))
    with pytest.raises(ConfigMismatchError, match="packing.window: 256 vs 128"):
        ops.merge([a, other], str(tmp_path / "no"))
    renamed = str(tmp_path / "other-teacher")
    write_synthetic_dataset(renamed, windows=2, seed=6, **SYNTH)
    manifest_path = os.path.join(renamed, MANIFEST_NAME)
    manifest = json.load(open(manifest_path))
    manifest["teacher"]["config_hash"] = "another-teacher"
    with open(manifest_path, "w") as fh:
        json.dump(manifest, fh)
    with pytest.raises(ConfigMismatchError, match="teacher.config_hash"):
        ops.merge([a, renamed], str(tmp_path / "no"))
    assert not (tmp_path / "no").exists()


def test_reencode_to_raw_is_exact_and_back(sources, tmp_path):
    a, _ = sources
    raw = str(tmp_path / "raw")
    result = ops.reencode(a, raw, codec="raw")
    assert open_dataset(raw).header.codec == "raw"
    assert result.stats["change"]["max_abs_logprob_change"] == 0.0
    for x, y in zip(_decoded(a), _decoded(raw)):
        np.testing.assert_array_equal(x.ids.numpy(), y.ids.numpy())
        np.testing.assert_array_equal(x.logprobs.numpy(), y.logprobs.numpy())


def test_reencode_to_a_smaller_k_keeps_the_largest_entries(sources, tmp_path):
    a, _ = sources
    out = str(tmp_path / "k8")
    result = ops.reencode(a, out, k=8)
    ds = open_dataset(out)
    assert ds.k == 8 and result.targets == "re-encoded"
    change = result.stats["change"]
    assert change["rows_compared"] > 0 and 0 <= change["mean_kl_renormalised"] < 1e-2
    for x, y in zip(_decoded(a), _decoded(out)):
        v = x.valid.numpy()
        top = x.logprobs.numpy()[v]
        # the 8 kept entries are the source's 8 largest (up to ties at the cut)
        assert (y.logprobs.numpy()[v].min(axis=1) >= top[:, 8] - 0.5).all()
    step = ds.manifest["extra"]["lineage"][-1]
    assert step["operation"] == "reencode" and step["params"]["k"] == 8


def test_reencode_refusals(sources, tmp_path):
    a, _ = sources
    with pytest.raises(ops.OperationError, match="between 1 and the source's k"):
        ops.reencode(a, str(tmp_path / "x"), k=32)
    with pytest.raises(ops.OperationError, match="unknown"):
        ops.reencode(a, str(tmp_path / "x"), codec="gzip")
    with pytest.raises(ops.OperationError, match="would equal the source"):
        ops.reencode(a, str(tmp_path / "x"))
    sampled = str(tmp_path / "sampled")
    write_synthetic_dataset(sampled, windows=1, seed=7, kind="sampled", **SYNTH)
    with pytest.raises(ops.OperationError, match="top-k targets only"):
        ops.reencode(sampled, str(tmp_path / "x"), k=4)
    assert not (tmp_path / "x").exists()


def test_cli_commands(sources, tmp_path, capsys):
    a, b = sources
    assert cli_main(["subset", a, "--out", str(tmp_path / "c1"), "--windows", "0:2",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == 2
    assert cli_main(["reencode", a, "--out", str(tmp_path / "c2"), "--codec", "qrank",
                     "--codec-param", "kl_target=0.002", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] and open_dataset(str(tmp_path / "c2")).codec.config()[
        "kl_target"] == 0.002
    assert cli_main(["merge", a, str(tmp_path / "c1"), "--out", str(tmp_path / "c3")]) == 0
    assert "verified OK" in capsys.readouterr().out
    assert cli_main(["reshard", a, "--out", str(tmp_path / "c1"), "--windows-per-shard",
                     "3"]) == 2
    assert "already holds a finished dataset" in capsys.readouterr().err


def test_subset_between_s3_buckets(s3, sources):
    a, _ = sources
    url = f"s3://{s3.new_bucket()}/copy"
    ops.reshard(a, url, windows_per_shard=3)
    out = f"s3://{s3.new_bucket()}/sub"
    result = ops.subset(url, out, windows="2:4")
    assert result.verified
    for x, y in zip(_raw(a)[2:4], _raw(out)):
        _same_window(x, y)
