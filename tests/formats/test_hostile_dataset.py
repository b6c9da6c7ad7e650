"""A shared dataset is hostile input: each tampering a forger could do (hashes made consistent),
and what `verify`, the reader and the training preflight do with it (docs/tamper.md)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kdcache.errors import FormatError, KdcacheError
from kdcache.formats.reader import open_dataset
from kdcache.formats.verify import preflight, verify_dataset
from tests.formats.fuzz_shards import (SHARD0, build, join_blob, read_batches, rehash,
                                       replace_blob, split_blob, write_batches)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    base = tmp_path_factory.mktemp("clean")
    for name in ("qrank-topk", "qrank-sampled", "raw-topk"):
        build(base / name, name)
    return base


@pytest.fixture
def copy(clean, tmp_path):
    def make(name="qrank-topk"):
        dst = tmp_path / "ds"
        shutil.copytree(clean / name, dst)
        return dst
    return make


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root, manifest):
    (root / "manifest.json").write_text(json.dumps(manifest))


def _refused_everywhere(root, match):
    """verify reports it, the reader and the preflight raise a FormatError matching `match`."""
    report = verify_dataset(root)
    assert not report.ok and any(__import__("re").search(match, p) for p in report.problems), \
        report.problems
    with pytest.raises(FormatError, match=match):
        ds = open_dataset(root)
        preflight(ds)
        for i in range(len(ds)):
            ds[i]


def _edit_blob(root, window, edit):
    schema, batches = read_batches(root / SHARD0)
    fields, raws, flags = split_blob(batches[window].column("targets")[0].as_py())
    edit(fields, raws, flags)
    batches[window] = replace_blob(batches[window], join_blob(fields, raws, flags))
    write_batches(root / SHARD0, schema, batches)
    rehash(root)


# -- qrank decoder ------------------------------------------------------------------------------

@pytest.mark.parametrize("column", [0, 3])
def test_col_bits_sign_bit_is_refused_not_a_segfault(copy, column):
    """The issue's crash: one flipped sign bit in col_bits (hash consistent) segfaulted verify,
    the reader, inspect and train. Run in a subprocess: a crash must fail the test, not kill it."""
    root = copy()

    def edit(fields, raws, flags):
        cols = np.frombuffer(raws[5], dtype="<u8").copy()
        cols[column] ^= np.uint64(1) << np.uint64(63)
        raws[5] = cols.tobytes()
    _edit_blob(root, 0, edit)
    code = ("import sys; from kdcache.formats.reader import open_dataset\n"
            "from kdcache.errors import FormatError\n"
            "try:\n    open_dataset(sys.argv[1])[0]\n"
            "except FormatError as e:\n    print('refused:', e)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv in ([sys.executable, "-c", code, str(root)],
                 [sys.executable, "-m", "kdcache.cli", "verify", str(root), "--json"],
                 [sys.executable, "-m", "kdcache.cli", "inspect", str(root), "--window", "0"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        assert out.returncode >= 0, f"{argv[1:3]} died with signal {-out.returncode}"
        assert "Traceback" not in out.stderr, out.stderr[-2000:]
        assert "corrupt top-k blob" in out.stdout + out.stderr, out.stdout + out.stderr


# -- JSON and metadata parsing --------------------------------------------------------------------

def test_deep_json_manifest_is_a_format_error(copy):
    root = copy()
    text = (root / "manifest.json").read_text().replace('"extra": {}', '"extra": ' + "[" * 100_000
                                                        + "]" * 100_000, 1)
    (root / "manifest.json").write_text(text)
    _refused_everywhere(root, "nested")


def test_nan_in_manifest_is_refused(copy):
    root = copy()
    text = (root / "manifest.json").read_text().replace('"temperature": 1.0', '"temperature": NaN')
    (root / "manifest.json").write_text(text)
    _refused_everywhere(root, "not valid JSON")


@pytest.mark.parametrize("path,value,match", [
    (("codec",), "qrank", "'codec' must be an object"),
    (("codec", "table"), "codec/table.bin", "codec.table must be"),
    (("packing", "window"), "96", "packing.window must be a positive integer"),
    (("targets", "k"), 8.5, "targets.k must be"),
    (("shards",), {"a": 1}, "'shards' must be a list"),
    (("totals", "windows"), None, "totals.windows must be"),
    (("totals", "target_bytes_per_token"), "20", "totals.target_bytes_per_token must be"),
])
def test_manifest_field_of_the_wrong_type_is_a_format_error(copy, path, value, match):
    root = copy()
    manifest = _manifest(root)
    node = manifest
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    _write_manifest(root, manifest)
    _refused_everywhere(root, match)


@pytest.mark.parametrize("field,value", [("windows", "2"), ("bytes", -5), ("xxh3", 12),
                                         ("first_window", True), ("name", None)])
def test_shard_entry_of_the_wrong_type_is_a_format_error(copy, field, value):
    root = copy()
    manifest = _manifest(root)
    manifest["shards"][1][field] = value
    _write_manifest(root, manifest)
    _refused_everywhere(root, field if field != "name" else "shard name")


def test_undecodable_schema_metadata_is_a_format_error(copy):
    root = copy()
    schema, batches = read_batches(root / SHARD0)
    meta = {**schema.metadata, b"kdcache.mode": b"\xff\xfe\xfd"}
    write_batches(root / SHARD0, schema.with_metadata(meta), batches)
    rehash(root)
    _refused_everywhere(root, "not valid UTF-8")


# -- paths confined to the dataset ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["../outside.arrow", "shards/../../outside.arrow",
                                  "/etc/passwd", "../../../../etc/passwd", "shards\\..\\x.arrow"])
def test_shard_name_out_of_the_dataset_is_refused(copy, tmp_path, name):
    root = copy()
    shutil.copyfile(root / SHARD0, tmp_path / "outside.arrow")
    manifest = _manifest(root)
    manifest["shards"][0]["name"] = name
    _write_manifest(root, manifest)
    _refused_everywhere(root, "not a plain path inside the dataset")


def test_codec_table_path_out_of_the_dataset_is_refused(copy, tmp_path):
    root = copy()
    shutil.copyfile(root / "codec" / "table.bin", tmp_path / "table.bin")
    manifest = _manifest(root)
    manifest["codec"]["table"]["path"] = "../table.bin"
    _write_manifest(root, manifest)
    _refused_everywhere(root, "codec table path '../table.bin' is not a plain path")


def test_symlink_out_of_the_dataset_is_refused(copy, tmp_path):
    root = copy()
    outside = tmp_path / "elsewhere.arrow"
    shutil.move(root / SHARD0, outside)
    (root / SHARD0).symlink_to(outside)
    _refused_everywhere(root, "outside the dataset")


def test_symlink_inside_the_dataset_is_followed(copy):
    root = copy()
    (root / "shards" / "real.arrow").write_bytes((root / SHARD0).read_bytes())
    (root / SHARD0).unlink()
    (root / SHARD0).symlink_to("real.arrow")
    ds = open_dataset(root)
    preflight(ds)
    assert ds[0].n_tokens > 0


def test_teacher_path_out_of_the_dataset_is_not_followed(copy, tmp_path):
    """A manifest's teacher.path names where a trainer reads (and copies) tokenizer files:
    honoured inside the dataset, dropped outside it (the manifest itself is left as it was)."""
    root = copy()
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "tokenizer.json").write_text("{}")
    manifest = _manifest(root)
    for path in (str(planted), "../planted", "teacher/../../planted"):
        manifest["teacher"]["path"] = path
        _write_manifest(root, manifest)
        ds = open_dataset(root)
        assert "path" not in ds.header.teacher, path
        assert ds.manifest["teacher"]["path"] == path
    (root / "teacher").mkdir()
    manifest["teacher"]["path"] = "teacher"
    _write_manifest(root, manifest)
    assert open_dataset(root).header.teacher["path"] == os.path.realpath(root / "teacher")


# -- metadata cross-checked, manifest consistent --------------------------------------------------

@pytest.mark.parametrize("section,field,value", [("packing", "mode", "causal"),
                                                 ("packing", "mode", "document-global")])
def test_mode_relabelled_only_in_the_manifest_is_refused(copy, section, field, value):
    root = copy()
    manifest = _manifest(root)
    manifest[section][field] = value
    _write_manifest(root, manifest)
    _refused_everywhere(root, r"shard says mode='document' but the manifest says mode=")


def test_duplicated_shard_entry_is_refused(copy):
    root = copy()
    manifest = _manifest(root)
    manifest["shards"].append(dict(manifest["shards"][0]))
    for key in ("windows", "tokens", "valid_rows"):
        manifest["totals"][key] += manifest["shards"][0][key]
    manifest["totals"]["shards"] += 1
    _write_manifest(root, manifest)
    _refused_everywhere(root, "listed more than once")


def test_same_shard_under_two_names_is_refused(copy):
    root = copy()
    manifest = _manifest(root)
    shutil.copyfile(root / SHARD0, root / "shards" / "copy.arrow")
    entry = {**manifest["shards"][0], "name": "shards/copy.arrow"}
    manifest["shards"].append(entry)
    for key in ("windows", "tokens", "valid_rows"):
        manifest["totals"][key] += entry[key]
    manifest["totals"]["shards"] += 1
    _write_manifest(root, manifest)
    _refused_everywhere(root, "overlapping window ranges")


@pytest.mark.parametrize("other", ["raw-topk", "qrank-sampled"])
def test_foreign_rehashed_shard_fails_the_preflight(clean, copy, other):
    """A shard of another dataset dropped in with its size and hash put in the manifest: the
    preflight (no target decoding) refuses it before training starts."""
    root = copy()
    shutil.copyfile(clean / other / SHARD0, root / SHARD0)
    rehash(root)
    ds = open_dataset(root)  # the manifest alone is consistent
    with pytest.raises(FormatError, match=r"shard-00000.arrow: (shard says|column) .*"):
        preflight(ds)
    assert not verify_dataset(root).ok


def test_window_index_outside_the_shard_range_fails_the_preflight(copy):
    root = copy()
    manifest = _manifest(root)
    a, b = manifest["shards"]  # swap the two shards' ranges: manifest consistent, shards not
    for key in ("first_window", "last_window"):
        a[key], b[key] = b[key], a[key]
    _write_manifest(root, manifest)
    with pytest.raises(FormatError, match="window_index 0, outside the manifest's 2..3"):
        preflight(open_dataset(root))


# -- shard contents --------------------------------------------------------------------------------

def test_column_of_another_type_is_refused(copy):
    import pyarrow as pa

    root = copy()
    schema, batches = read_batches(root / SHARD0)
    i = schema.names.index("tokens")
    new_schema = schema.set(i, schema.field(i).with_type(pa.list_(pa.int64())))
    batches = [pa.RecordBatch.from_arrays([b.column(n).cast(new_schema.field(n).type)
                                           for n in schema.names], schema=new_schema)
               for b in batches]
    write_batches(root / SHARD0, new_schema, batches)
    rehash(root)
    _refused_everywhere(root, "column 'tokens' has type list<item: int64>")


def test_invalid_codec_parameters_are_a_format_error(copy):
    root = copy()
    manifest = _manifest(root)
    manifest["codec"]["params"]["step_max"] = -3
    _write_manifest(root, manifest)
    _refused_everywhere(root, "codec 'qrank' with these parameters")


def test_corrupt_rank_table_with_consistent_hash_is_a_format_error(copy):
    root = copy()
    path = root / "codec" / "table.bin"
    data = bytearray(path.read_bytes())
    data[5] ^= 0x40  # the table's vocabulary size
    path.write_bytes(bytes(data))
    manifest = _manifest(root)
    manifest["codec"]["table"]["xxh3"] = xxhash.xxh3_64(bytes(data)).hexdigest()
    _write_manifest(root, manifest)
    _refused_everywhere(root, "cannot be set up")


def _rewrite_window(root, window, **arrays):
    """Replace list columns of one window (raw dataset), hash made consistent."""
    import pyarrow as pa

    schema, batches = read_batches(root / SHARD0)
    b = batches[window]
    cols = []
    for name in schema.names:
        if name in arrays:
            values = pa.array(arrays[name], type=schema.field(name).type.value_type)
            cols.append(pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values))
        else:
            cols.append(b.column(name))
    batches[window] = pa.RecordBatch.from_arrays(cols, schema=schema)
    write_batches(root / SHARD0, schema, batches)
    rehash(root)


def test_valid_flag_on_a_document_end_is_refused_by_the_reader(copy):
    """A row the packing mode gives no target (a document's last token) marked valid would
    train on a target across a document boundary; the reader refuses it, not only verify."""
    root = copy("raw-topk")
    w = open_dataset(root)[0]
    valid = w.valid.numpy().copy()
    offsets = w.doc_offsets.numpy()
    valid[offsets[1] - 1] = True
    ds_valid = valid.tolist()
    _rewrite_window(root, 0, valid=ds_valid)
    with pytest.raises(FormatError, match="marked valid but has no target in 'document' packing"):
        open_dataset(root)[0]


def test_offsets_not_rising_are_refused_by_the_reader(copy):
    root = copy("raw-topk")
    offsets = open_dataset(root)[0].doc_offsets.numpy().copy()
    offsets[1], offsets[2] = offsets[2], offsets[1]
    _rewrite_window(root, 0, doc_offsets=offsets.tolist())
    with pytest.raises(FormatError, match="doc_offsets must rise strictly"):
        open_dataset(root)[0]


def test_only_kdcache_errors_escape_a_truncated_manifest(copy):
    root = copy()
    data = (root / "manifest.json").read_bytes()
    for cut in range(0, len(data), max(1, len(data) // 40)):
        (root / "manifest.json").write_bytes(data[:cut] + b"\xff")
        with pytest.raises(KdcacheError):
            open_dataset(root)
        assert not verify_dataset(root).ok


def test_inspect_of_a_window_out_of_range_is_a_clear_error(clean):
    from kdcache.formats.inspect import window_preview

    ds = open_dataset(clean / "qrank-topk")
    with pytest.raises(KdcacheError, match=r"--window 4 is out of range: the dataset holds windows "
                                           r"0\.\.3"):
        window_preview(ds, 4)
