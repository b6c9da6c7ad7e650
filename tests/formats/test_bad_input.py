"""Every kind of bad input the format must catch, injected one by one: a clear error that names the
file and the problem, and nothing lost or half-visible."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from kdcache.errors import FormatError, TargetValidationError
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.reader import open_dataset
from kdcache.formats.storage import StorageError
from kdcache.formats.synthetic import synthetic_window
from kdcache.formats.verify import verify_dataset
from kdcache.formats.writer import DatasetWriter, make_codec, write_shard

N, K, V = 48, 6, 500


def _header(kind="topk", k=K):
    return DatasetHeader(kind=kind, k=k, vocab_size=V, codec="raw",
                         packing={"window": N, "mode": "document", "bos_id": 1, "eos_id": 2})


def _rec(i=0, kind="topk", seed=0):
    return synthetic_window(np.random.default_rng(seed + i), i, N, V, K, kind=kind, doc_len=(4, 20))


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "ds"
    with DatasetWriter(root, _header(), windows_per_shard=2) as w:
        for i in range(4):
            w.add(_rec(i))
    return root


def _shard(root, i=0):
    return root / "shards" / f"shard-{i:05d}.arrow"


# -- reader and verify -------------------------------------------------------------------------

def test_truncated_shard(dataset):
    path = _shard(dataset, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 37])
    with pytest.raises(FormatError, match=r"shard-00001\.arrow: size .* \(truncated shard\)"):
        open_dataset(dataset)[2]
    report = verify_dataset(dataset)
    assert not report.ok and any("truncated" in p and "shard-00001" in p for p in report.problems)


def test_one_flipped_byte_anywhere_is_caught(dataset):
    path = _shard(dataset, 0)
    original = path.read_bytes()
    for pos in (7, len(original) // 3, len(original) // 2, len(original) - 9):
        data = bytearray(original)
        data[pos] ^= 0x10
        path.write_bytes(bytes(data))
        with pytest.raises(FormatError, match=r"shard-00000\.arrow"):
            open_dataset(dataset)[0]
        report = verify_dataset(dataset)
        assert not report.ok and "shard-00000.arrow" in report.problems[0]
    path.write_bytes(original)
    assert verify_dataset(dataset).ok


def test_missing_shard(dataset):
    os.remove(_shard(dataset, 1))
    with pytest.raises(FormatError, match=r"shard-00001\.arrow: shard listed in the manifest is missing"):
        open_dataset(dataset)[3]
    assert open_dataset(dataset)[0].n_tokens == N  # the other shard still reads
    report = verify_dataset(dataset)
    assert any("missing" in p for p in report.problems)


def test_unknown_major_version(dataset):
    mpath = dataset / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["format_version"] = "2.0.0"
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=r"manifest\.json: format_version 2\.0\.0 has major version 2"):
        open_dataset(dataset)
    manifest["format_version"] = "1.7.0"  # a newer minor version of major 1 stays readable
    mpath.write_text(json.dumps(manifest))
    assert len(open_dataset(dataset)) == 4


def test_k_mismatch_between_manifest_and_shard(tmp_path, dataset):
    # A shard of the same layout but k=5, swapped in with its size and hash patched into the
    # manifest: only the k check can catch it.
    other = tmp_path / "other"
    with DatasetWriter(other, _header(k=5), windows_per_shard=2) as w:
        for i in range(2):
            w.add(synthetic_window(np.random.default_rng(i), i, N, V, 5, doc_len=(4, 20)))
    shutil.copy(_shard(other, 0), _shard(dataset, 0))
    manifest = json.loads((dataset / "manifest.json").read_text())
    other_entry = json.loads((other / "manifest.json").read_text())["shards"][0]
    manifest["shards"][0].update(bytes=other_entry["bytes"], xxh3=other_entry["xxh3"])
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=r"shard-00000\.arrow: shard says k='5' but the manifest says k='6'"):
        open_dataset(dataset)[0]
    assert not verify_dataset(dataset).ok


def test_garbage_manifest(dataset):
    (dataset / "manifest.json").write_text("{not json")
    with pytest.raises(FormatError, match="manifest.json: not valid JSON"):
        open_dataset(dataset)
    (dataset / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FormatError, match="not a kdcache manifest"):
        open_dataset(dataset)


# -- writer-side validation --------------------------------------------------------------------

def _write_one(tmp_path, rec, header=None):
    header = header or _header()
    return write_shard(str(tmp_path / "w"), "shard-00000", [rec], header, make_codec(header))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_writer_rejects_nonfinite_logprobs(tmp_path, bad):
    rec = _rec()
    row = int(np.flatnonzero(rec.valid)[3])
    rec.values[row, 2] = bad
    with pytest.raises(TargetValidationError, match=rf"shard-00000\.arrow: window 0: row {row}: log-prob is NaN or infinite"):
        _write_one(tmp_path, rec)
    assert not list((tmp_path / "w" / "shards").glob("*"))  # nothing half-written stays


def test_writer_rejects_ids_beyond_vocab(tmp_path):
    rec = _rec()
    row = int(np.flatnonzero(rec.valid)[0])
    rec.ids[row, 0] = V
    with pytest.raises(TargetValidationError, match=rf"row {row}: id out of range \[0, {V}\)"):
        _write_one(tmp_path, rec)


def test_writer_rejects_wrong_k(tmp_path):
    rec = _rec()
    rec.ids, rec.values = rec.ids[:, :4], rec.values[:, :4]
    with pytest.raises(TargetValidationError, match="wrong k: targets have 4 entries per row, the dataset's k is 6"):
        _write_one(tmp_path, rec)


def test_writer_rejects_unsorted_duplicate_and_unnormalised(tmp_path):
    rec = _rec()
    row = int(np.flatnonzero(rec.valid)[1])
    rec.values[row, [0, 1]] = rec.values[row, [1, 0]]
    with pytest.raises(TargetValidationError, match="not sorted in descending order"):
        _write_one(tmp_path, rec)
    rec = _rec()
    rec.ids[row, 1] = rec.ids[row, 0]
    with pytest.raises(TargetValidationError, match="an id appears twice"):
        _write_one(tmp_path, rec)
    rec = _rec()
    rec.values[row] = np.log(np.full(K, 0.5, dtype=np.float32))
    with pytest.raises(TargetValidationError, match="sum to more than 1"):
        _write_one(tmp_path, rec)


def test_writer_rejects_bad_sampled_weights_and_tokens(tmp_path):
    header = _header(kind="sampled")
    rec = _rec(kind="sampled")
    row = int(np.flatnonzero(rec.valid)[0])
    rec.values[row, 0] += 0.5
    with pytest.raises(TargetValidationError, match=rf"row {row}: weights sum to"):
        _write_one(tmp_path, rec, header)
    rec = _rec()
    rec.tokens[5] = V + 3
    with pytest.raises(TargetValidationError, match="token id out of range"):
        _write_one(tmp_path, rec)
    rec = _rec()
    rec.valid[int(rec.doc_offsets[1]) - 1] = True  # a document's EOS row claims a target
    with pytest.raises(TargetValidationError, match="has no target in 'document' packing"):
        _write_one(tmp_path, rec)


# -- full disk ---------------------------------------------------------------------------------

def _many_windows(n):
    return [_rec(i) for i in range(n)]


def test_full_disk_on_small_tmpfs_leaves_nothing_visible(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the RLIMIT_FSIZE test covers it")
    try:
        header = _header()
        with pytest.raises(StorageError, match=r"shard-00000\.arrow: write failed: no space left on device"):
            write_shard(str(mnt / "ds"), "shard-00000", _many_windows(60), header, make_codec(header))
        assert list((mnt / "ds" / "shards").iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_file_size_quota_leaves_nothing_visible(tmp_path):
    # RLIMIT_FSIZE is a per-process write quota any user can set: run the writer under it.
    script = f"""
import resource, signal, sys
sys.path.insert(0, {os.getcwd()!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
import numpy as np
from kdcache.formats.writer import write_shard, make_codec
from tests.formats.test_bad_input import _header, _many_windows
h = _header()
try:
    write_shard({str(tmp_path / 'ds')!r}, "shard-00000", _many_windows(60), h, make_codec(h))
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert "StorageError" in out.stdout and "write failed: File too large" in out.stdout, out
    assert list((tmp_path / "ds" / "shards").iterdir()) == []
