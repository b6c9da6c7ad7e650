"""`verify` (formats/verify.py) on its own: what it counts on a good dataset, that it lists every
problem of a bad copy instead of stopping at the first, what `decode=False` leaves out, stray
files, remote copies checked as stored, and the trainer's cheaper `preflight`. The tampering
cases a forger could make (and what the reader does with them) are in test_hostile_dataset.py;
injected damage that the reader must also catch is in test_bad_input.py."""

import json
import shutil
import tempfile

import fsspec
import numpy as np
import pyarrow as pa
import pytest

from kdcache.errors import FormatError
from kdcache.formats.reader import LogitDataset, open_dataset
from kdcache.formats.storage import TMP_MARKER
from kdcache.formats.verify import preflight, verify_dataset
from tests.formats.fuzz_shards import (DATASETS, SHARD0, build, read_batches, rehash, replace_blob,
                                       write_batches)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """4 windows in 2 shards of each codec and kind (fuzz_shards.build), built once."""
    base = tmp_path_factory.mktemp("clean")
    for name in DATASETS:
        build(base / name, name)
    return base


@pytest.fixture
def ds(clean, tmp_path):
    """A copy of the raw-topk dataset (raw targets can be re-encoded without checks)."""
    root = tmp_path / "ds"
    shutil.copytree(clean / "raw-topk", root)
    return root


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


def _shard(root, i):
    return root / "shards" / f"shard-{i:05d}.arrow"


@pytest.mark.parametrize("name", DATASETS)
def test_a_good_dataset_passes_and_every_window_is_counted(clean, tmp_path, name):
    ds = tmp_path / name
    shutil.copytree(clean / name, ds)
    manifest = _manifest(ds)
    for decode in (True, False):
        report = verify_dataset(ds, decode=decode)
        assert report.ok and report.problems == [] and report.warnings == []
        assert report.shards_checked == len(manifest["shards"]) == 2
        assert report.windows_checked == manifest["totals"]["windows"] == 4
        assert report.tokens_checked == manifest["totals"]["tokens"]
    summary = json.loads(json.dumps(report.as_dict()))
    assert summary == {"root": str(ds), "ok": True, "problems": [], "warnings": [],
                       "shards_checked": 2, "windows_checked": 4,
                       "tokens_checked": manifest["totals"]["tokens"]}


def test_every_problem_of_a_copy_is_listed_not_only_the_first(ds):
    row = _unsorted_targets(ds, shard=1, window=0)
    data = _shard(ds, 0).read_bytes()
    _shard(ds, 0).write_bytes(data[:-37])
    report = verify_dataset(ds)
    assert not report.ok and report.shards_checked == 1 and report.windows_checked == 1
    assert len(report.problems) == 2, report.problems
    assert "shard-00000.arrow" in report.problems[0] and "truncated" in report.problems[0]
    assert "shard-00001.arrow" in report.problems[1] and f"row {row}" in report.problems[1]
    # window indices 2 and 3 alone are not "outside 0..1": the index check needs every shard
    assert not any("window_index" in p or "window indices" in p for p in report.problems)
    assert not report.as_dict()["ok"]


def test_a_directory_that_is_no_dataset_is_a_problem_not_an_exception(tmp_path):
    report = verify_dataset(tmp_path)
    assert not report.ok and "manifest.json" in report.problems[0]
    assert report.shards_checked == 0


def _unsorted_targets(root, shard=0, window=1):
    """Window `window` of shard `shard` with one row's log-probs reversed (no longer
    descending), re-encoded without the writer's checks, size and hash made consistent."""
    path = f"shards/shard-{shard:05d}.arrow"
    schema, batches = read_batches(root / path)
    first = _manifest(root)["shards"][shard]["first_window"]
    w = LogitDataset(root)[first + window]
    ids, logprobs, valid = w.ids.numpy().copy(), w.logprobs.numpy().copy(), w.valid.numpy()
    row = int(np.flatnonzero(valid)[2])
    logprobs[row] = logprobs[row][::-1].copy()
    blob = LogitDataset(root).codec.encode(ids[valid], logprobs[valid])
    batches[window] = replace_blob(batches[window], blob)
    write_batches(root / path, schema, batches)
    rehash(root, path)
    return row


def test_targets_are_checked_only_when_decoded(ds):
    row = _unsorted_targets(ds)
    report = verify_dataset(ds)
    assert not report.ok and len(report.problems) == 1, report.problems
    assert "shard-00000.arrow" in report.problems[0] and f"row {row}" in report.problems[0]
    assert "not sorted in descending order" in report.problems[0]
    assert report.windows_checked == 3  # the bad window is not counted as checked
    assert verify_dataset(ds, decode=False).ok  # structure, sizes and hashes are all intact
    preflight(open_dataset(ds), hashes=True)  # and so is what a trainer checks up front


def test_shard_token_and_target_counts_must_match_the_manifest(ds):
    manifest = _manifest(ds)
    manifest["shards"][1]["tokens"] -= 3
    manifest["shards"][1]["valid_rows"] -= 2
    manifest["totals"]["tokens"] -= 3
    manifest["totals"]["valid_rows"] -= 2
    (ds / "manifest.json").write_text(json.dumps(manifest))
    report = verify_dataset(ds)
    tokens, valid_rows = manifest["shards"][1]["tokens"], manifest["shards"][1]["valid_rows"]
    assert [p.split(": ", 1)[1] for p in report.problems] == [
        f"{tokens + 3} tokens, manifest says {tokens}",
        f"{valid_rows + 2} valid_rows, manifest says {valid_rows}"]
    assert all("shard-00001.arrow" in p for p in report.problems)


def test_a_window_index_stored_twice_is_reported(ds):
    schema, batches = read_batches(ds / SHARD0)
    second = batches[1]
    batches[1] = pa.RecordBatch.from_arrays(
        [pa.array([0], type=schema.field("window_index").type) if name == "window_index"
         else second.column(name) for name in schema.names], schema=schema)
    write_batches(ds / SHARD0, schema, batches)
    rehash(ds)
    report = verify_dataset(ds, decode=False)
    assert report.problems == ["window_index repeated across shards: [0]"]


def test_stray_files_are_warnings_and_the_dataset_still_passes(ds):
    (ds / "shards" / f"shard-00002.arrow{TMP_MARKER}ab12cd34").write_bytes(b"half a shard")
    (ds / "shards" / "notes.arrow").write_bytes(b"not listed")
    report = verify_dataset(ds)
    assert report.ok
    assert report.warnings == [
        f"{ds}/shards/notes.arrow: file not in manifest",
        f"{ds}/shards/shard-00002.arrow{TMP_MARKER}ab12cd34: leftover temporary file"]


def test_a_remote_copy_is_verified_as_stored_and_leaves_no_scratch(clean, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    fs = fsspec.filesystem("memory")
    url = "memory://verify-test/ds"
    fs.put(str(clean / "raw-topk"), "/verify-test/ds", recursive=True)
    try:
        report = verify_dataset(url)
        assert report.ok and report.windows_checked == 4
        assert list(scratch.iterdir()) == []  # the downloaded shards went with the check
        data = bytearray(fs.cat_file("/verify-test/ds/" + SHARD0))
        data[len(data) // 2] ^= 0x01
        fs.pipe_file("/verify-test/ds/" + SHARD0, bytes(data))
        report = verify_dataset(url)  # the same process: nothing was kept from the first check
        assert not report.ok and "shard-00000.arrow" in report.problems[0]
        assert list(scratch.iterdir()) == []
    finally:
        fs.rm("/verify-test", recursive=True)


def test_preflight_passes_a_clean_dataset(clean):
    for name in ("qrank-topk", "qrank-sampled", "raw-topk"):
        preflight(open_dataset(clean / name), hashes=True)


def test_preflight_lists_every_unreadable_shard_without_decoding_targets(ds):
    preflight(open_dataset(ds))
    _shard(ds, 0).write_bytes(_shard(ds, 0).read_bytes()[:-37])
    _shard(ds, 1).write_bytes(b"ARROW1" + _shard(ds, 1).read_bytes()[6:-1])
    with pytest.raises(FormatError) as caught:
        preflight(open_dataset(ds))
    message = str(caught.value)
    assert message.startswith(f"{ds}: dataset fails the pre-training check (2 problems; "
                              "`kdcache verify` checks every window):")
    assert "shard-00000.arrow" in message and "shard-00001.arrow" in message


def test_preflight_checks_hashes_only_when_asked(ds):
    """One byte of a shard's body changed (same size, the Arrow structure intact): only the
    hash can tell, and the preflight reads every byte for it only with hashes=True."""
    original = _shard(ds, 1).read_bytes()
    for pos in range(len(original) // 2, len(original) // 2 + 512):
        data = bytearray(original)
        data[pos] ^= 0x01
        _shard(ds, 1).write_bytes(bytes(data))
        try:
            preflight(open_dataset(ds))
            break
        except FormatError:
            continue  # that byte was part of what the preflight reads: try the next
    else:
        pytest.fail("no byte of the shard's body is outside what the preflight reads")
    with pytest.raises(FormatError, match=r"shard-00001\.arrow.*xxh3"):
        preflight(open_dataset(ds), hashes=True)
    assert not verify_dataset(ds).ok
