"""Reader fuzz: mutated datasets fed to `verify`, the reader and the training preflight.

Each case is one mutation, chosen from the case number alone (so any case can be replayed), of
one of three small datasets (qrank top-k with its rank table, qrank sampled, raw top-k):

  bytes         random byte edits of a shard (flip, truncate, insert, overwrite), the manifest's
                size and hash made consistent half of the time
  qrank-header  one field of a window's qrank blob header (magic, version, kind, flags, param,
                m, k, total bits, stream count) set to a boundary or random value
  qrank-table   one entry of the blob's stream table (stored length, raw length, zstd flag)
  qrank-stream  the decompressed bytes of one stream edited (col_bits entries set to sign-bit,
                huge, off-by-one and swapped values included), recompressed, lengths consistent
  codec-table   the dataset's codec/table.bin edited
  arrow-meta    the shards' schema metadata: keys dropped, values relabelled (mode, kind, k,
                vocabulary, codec, version), undecodable UTF-8, deep JSON, long values
  arrow-columns a column's type changed, nulls, two rows in a batch
  manifest      the manifest: deep JSON, NaN, wrong types, paths out of the dataset (.., absolute,
                symlinks), duplicated entries, relabelled fields, undecodable bytes
  values        decoded targets and structure edited (NaN/inf/positive log-probs, -1 and
                out-of-range ids, duplicates, unsorted rows, tokens, offsets, valid flags) and
                re-encoded with the raw codec, bypassing the writer's checks

and every mutated dataset has its manifest made consistent where the family says so, so the
parsers (not just the hash check) see the damage. Per case: `verify` must return a report, the
reader and `preflight` may raise only KdcacheError, and when any window is invalid (the reader
refuses it or the writer's own checks reject what it decodes) `verify` must not pass.

Cases run in worker subprocesses under an address-space limit; a worker that dies (a crash) or
stops answering (a hang) is counted against its case and replaced. Usage:

    python -m tests.formats.fuzz_shards --cases 10000 --workers 2 [--json figures.json]

prints one JSON line of figures (counts by outcome and exception type, crashes, hangs, misses).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

N, K, V = 96, 8, 3000
DATASETS = ("qrank-topk", "qrank-sampled", "raw-topk")
FAMILIES = ("bytes", "qrank-header", "qrank-table", "qrank-stream", "codec-table", "arrow-meta",
            "arrow-columns", "manifest", "values")
SHARD0 = "shards/shard-00000.arrow"
CASE_TIMEOUT_S = 60.0  # a case takes well under a second; this long means a hang
MEMORY_LIMIT = 6 << 30  # address space of a worker: a runaway allocation fails, not the host

_HEAD = struct.Struct("<3sBBBHIIQB")
_STREAM = struct.Struct("<IIB")
_HEAD_FIELDS = ("magic", "version", "kind", "flags", "param", "m", "k", "total_bits", "n_streams")
_HEAD_MAX = {"version": 255, "kind": 255, "flags": 255, "param": 2**16 - 1, "m": 2**32 - 1,
             "k": 2**32 - 1, "total_bits": 2**64 - 1, "n_streams": 255}


# -- building and rewriting datasets -----------------------------------------------------------

def build(root: Path, name: str) -> None:
    from kdcache.formats.manifest import DatasetHeader
    from kdcache.formats.synthetic import synthetic_window
    from kdcache.formats.writer import DatasetWriter

    codec, kind = name.split("-")
    header = DatasetHeader(kind=kind, k=K, vocab_size=V, codec=codec,
                           packing={"window": N, "mode": "document", "bos_id": 1, "eos_id": 2})
    with DatasetWriter(root, header, windows_per_shard=2) as w:
        for i in range(4):
            w.add(synthetic_window(np.random.default_rng(i), i, N, V, K, kind=kind,
                                   doc_len=(8, 40)))


def read_batches(path: Path):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path), "r") as src:
        f = ipc.open_file(src)
        return f.schema, [f.get_batch(j) for j in range(f.num_record_batches)]


def write_batches(path: Path, schema, batches) -> None:
    import pyarrow.ipc as ipc

    from kdcache.formats.writer import IPC_OPTIONS

    import pyarrow as pa

    with ipc.new_file(str(path), schema, options=IPC_OPTIONS) as w:
        for b in batches:
            w.write_batch(pa.RecordBatch.from_arrays(b.columns, schema=schema))


def replace_blob(batch, blob: bytes):
    import pyarrow as pa

    cols = [pa.array([blob], type=pa.large_binary()) if name == "targets" else batch.column(name)
            for name in batch.schema.names]
    return pa.RecordBatch.from_arrays(cols, schema=batch.schema)


def rehash(root: Path, shard: str = SHARD0) -> None:
    """Make the manifest's size and hash of `shard` match its bytes (a careful forger would)."""
    import xxhash

    data = (root / shard).read_bytes()
    mpath = root / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for entry in manifest["shards"]:
        if entry["name"] == shard:
            entry.update(bytes=len(data), xxh3=xxhash.xxh3_64(data).hexdigest())
    mpath.write_text(json.dumps(manifest))


# -- qrank blobs ---------------------------------------------------------------------------------

def split_blob(blob: bytes) -> tuple[list, list[bytes], list[int]]:
    """(header fields, raw streams, zstd flags) of a well-formed qrank blob."""
    import zstandard

    fields = list(_HEAD.unpack_from(blob))
    n = fields[-1]
    pos = _HEAD.size + n * _STREAM.size
    raws, flags = [], []
    for i in range(n):
        zlen, raw_len, packed = _STREAM.unpack_from(blob, _HEAD.size + i * _STREAM.size)
        data = blob[pos:pos + zlen]
        pos += zlen
        raws.append(zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_len)
                    if packed else data)
        flags.append(packed)
    return fields, raws, flags


def join_blob(fields: list, raws: list[bytes], flags: list[int],
              table: list[tuple[int, int, int]] | None = None) -> bytes:
    """A qrank blob from its parts (streams recompressed); `table` overrides the stream table."""
    import zstandard

    stored = [zstandard.ZstdCompressor(level=3).compress(r) if f else r
              for r, f in zip(raws, flags)]
    entries = table or [(len(z), len(r), f) for z, r, f in zip(stored, raws, flags)]
    return (_HEAD.pack(*fields) + b"".join(_STREAM.pack(*e) for e in entries)
            + b"".join(stored))


def boundary(rng: np.random.Generator, original: int, top: int) -> int:
    choices = [0, 1, original - 1, original + 1, top, top - 1, top // 2 + 1,
               int(rng.integers(0, top, dtype=np.uint64, endpoint=True))]
    return int(np.clip(choices[int(rng.integers(len(choices)))], 0, top))


def edit_bytes(rng: np.random.Generator, data: bytes, ops: int | None = None) -> bytes:
    buf = bytearray(data)
    for _ in range(ops or int(rng.integers(1, 5))):
        kind = int(rng.integers(4))
        pos = int(rng.integers(0, max(len(buf), 1)))
        if kind == 0 and buf:
            buf[pos] ^= int(rng.integers(1, 256))
        elif kind == 1:
            del buf[pos:]
        elif kind == 2:
            buf[pos:pos] = rng.integers(0, 256, size=int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        else:
            val = int(rng.integers(0, 256))
            buf[pos:pos + 8] = bytes([val]) * len(buf[pos:pos + 8])
    return bytes(buf)


def edit_col_bits(rng: np.random.Generator, raw: bytes) -> tuple[bytes, str]:
    cols = np.frombuffer(raw, dtype="<u8").copy()
    j = 0 if rng.random() < 0.3 else int(rng.integers(cols.size))  # column 0: the crash
    how = ["sign", "max", "plus1", "minus1", "swap", "zero", "huge", "random"][int(rng.integers(8))]
    if how == "sign":
        cols[j] ^= np.uint64(1) << np.uint64(63)
    elif how == "max":
        cols[j] = np.uint64(2**64 - 1)
    elif how == "plus1":
        cols[j] += np.uint64(1)
    elif how == "minus1":
        cols[j] -= np.uint64(1)
    elif how == "swap" and cols.size > 1:
        i = int(rng.integers(cols.size))
        cols[i], cols[j] = cols[j], cols[i]
    elif how == "zero":
        cols[j] = 0
    elif how == "huge":
        cols[j] = np.uint64(int(rng.integers(2**40, 2**62)))
    else:
        cols[j] = np.uint64(int(rng.integers(0, 2**63, dtype=np.uint64)))
    return cols.tobytes(), f"col_bits[{j}] {how}"


# -- mutations: each edits the dataset at `root` and returns a description ---------------------

def mutate_bytes(rng, root: Path, name: str) -> str:
    path = root / SHARD0
    path.write_bytes(edit_bytes(rng, path.read_bytes()))
    consistent = bool(rng.integers(2))
    if consistent:
        rehash(root)
    return f"shard bytes edited{', manifest rehashed' if consistent else ''}"


def _with_blob(rng, root: Path, edit) -> str:
    """Edit one window's targets blob (a raw-codec blob, not qrank, gets its bytes edited)."""
    schema, batches = read_batches(root / SHARD0)
    j = int(rng.integers(len(batches)))
    blob = batches[j].column("targets")[0].as_py()
    if blob[:3] == b"QRK":
        new_blob, what = edit(blob)
    else:
        new_blob, what = edit_bytes(rng, blob), "raw blob bytes edited"
    batches[j] = replace_blob(batches[j], new_blob)
    write_batches(root / SHARD0, schema, batches)
    rehash(root)
    return f"window {j}: {what}"


def mutate_qrank_header(rng, root: Path, name: str) -> str:
    def edit(blob):
        fields = list(_HEAD.unpack_from(blob))
        i = int(rng.integers(len(fields)))
        if i == 0:
            fields[0] = bytes(rng.integers(0, 256, size=3, dtype=np.uint8))
        else:
            fields[i] = boundary(rng, fields[i], _HEAD_MAX[_HEAD_FIELDS[i]])
        return _HEAD.pack(*fields) + blob[_HEAD.size:], f"header {_HEAD_FIELDS[i]}={fields[i]!r}"
    return _with_blob(rng, root, edit)


def mutate_qrank_table(rng, root: Path, name: str) -> str:
    def edit(blob):
        fields, raws, flags = split_blob(blob)
        stored = join_blob(fields, raws, flags)
        table = [list(_STREAM.unpack_from(stored, _HEAD.size + i * _STREAM.size))
                 for i in range(len(raws))]
        i, f = int(rng.integers(len(table))), int(rng.integers(3))
        table[i][f] = boundary(rng, table[i][f], 255 if f == 2 else 2**32 - 1)
        return join_blob(fields, raws, flags, [tuple(t) for t in table]), \
            f"stream {i} table {('stored', 'raw', 'zstd')[f]}={table[i][f]}"
    return _with_blob(rng, root, edit)


def mutate_qrank_stream(rng, root: Path, name: str) -> str:
    def edit(blob):
        fields, raws, flags = split_blob(blob)
        i = int(rng.integers(len(raws)))
        if name == "qrank-topk" and (i == 5 or rng.random() < 0.4):
            i = 5  # col_bits: where each column's extra bits start
            raws[i], what = edit_col_bits(rng, raws[i])
        else:
            raws[i], what = edit_bytes(rng, raws[i]), f"stream {i} bytes edited"
        return join_blob(fields, raws, flags), what
    return _with_blob(rng, root, edit)


def mutate_codec_table(rng, root: Path, name: str) -> str:
    import xxhash

    path = root / "codec" / "table.bin"
    if not path.exists():
        return mutate_bytes(rng, root, name)
    data = path.read_bytes()
    if rng.random() < 0.5:  # inside the zstd payload: decompress, edit, recompress
        import zstandard

        head, payload = data[:17], zstandard.ZstdDecompressor().decompress(data[17:])
        packed = zstandard.ZstdCompressor().compress(edit_bytes(rng, payload))
        data = head[:13] + struct.pack("<I", len(packed)) + packed
        if rng.random() < 0.5:
            data = edit_bytes(rng, data, 1)
    else:
        data = edit_bytes(rng, data)
    path.write_bytes(data)
    mpath = root / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["codec"]["table"].update(bytes=len(data), xxh3=xxhash.xxh3_64(data).hexdigest())
    mpath.write_text(json.dumps(manifest))
    return "codec table edited, manifest rehashed"


def _deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def mutate_arrow_meta(rng, root: Path, name: str) -> str:
    schema, batches = read_batches(root / SHARD0)
    meta = dict(schema.metadata or {})
    keys = sorted(meta)
    key = keys[int(rng.integers(len(keys)))]
    how = int(rng.integers(8))
    relabel = {b"kdcache.mode": [b"causal", b"document-global"], b"kdcache.kind": [b"sampled", b"topk"],
               b"kdcache.k": [str(K + 1).encode(), b"0", b"-1", b"9" * 30],
               b"kdcache.vocab_size": [str(V - 1).encode(), b"2147483648"],
               b"kdcache.codec": [b"raw", b"qrank", b"none"],
               b"kdcache.format_version": [b"2.0.0", b"", b"x"]}
    if how == 0:
        del meta[key]
        what = f"metadata {key!r} dropped"
    elif how == 1:
        meta[key] = bytes(rng.integers(128, 256, size=int(rng.integers(1, 8)), dtype=np.uint8))
        what = f"metadata {key!r} = undecodable UTF-8"
    elif how == 2:
        meta[b"kdcache.\xff" + bytes(rng.integers(128, 256, size=3, dtype=np.uint8))] = b"x"
        what = "metadata key with undecodable UTF-8"
    elif how == 3:
        meta[key] = _deep_json(int(rng.integers(100, 100_000))).encode()
        what = f"metadata {key!r} = deep JSON"
    elif how == 4:
        meta[key] = b"1" * int(rng.integers(1000, 1 << 20))
        what = f"metadata {key!r} = long value"
    elif how == 5:
        meta = {}
        what = "metadata removed"
    else:
        options = relabel.get(key, [b"?"])
        meta[key] = options[int(rng.integers(len(options)))]
        what = f"metadata {key!r} = {meta[key][:20]!r}"
    schema = schema.with_metadata(meta)
    write_batches(root / SHARD0, schema, [b.replace_schema_metadata(meta) for b in batches])
    rehash(root)
    return what


def mutate_arrow_columns(rng, root: Path, name: str) -> str:
    import pyarrow as pa

    schema, batches = read_batches(root / SHARD0)
    how = int(rng.integers(4))
    names = schema.names
    col = names[int(rng.integers(len(names)))]
    if how == 0:  # another type for one column
        alt = {"window_index": pa.int64(), "tokens": pa.list_(pa.int64()),
               "doc_offsets": pa.list_(pa.int64()), "doc_ids": pa.list_(pa.int32()),
               "doc_pieces": pa.list_(pa.int64()), "valid": pa.list_(pa.uint8()),
               "targets": pa.binary()}[col]
        new = []
        for b in batches:
            arrays = [b.column(n).cast(alt) if n == col else b.column(n) for n in names]
            new.append(pa.RecordBatch.from_arrays(arrays, names=names))
        schema = pa.schema([schema.field(n).with_type(alt) if n == col else schema.field(n)
                            for n in names], metadata=schema.metadata)
        batches = [b.replace_schema_metadata(schema.metadata) for b in new]
        what = f"column {col} as {alt}"
    elif how == 1:  # a null where none may be
        schema = pa.schema([schema.field(n).with_nullable(True) for n in names],
                           metadata=schema.metadata)
        new = []
        for b in batches:
            arrays = [pa.nulls(1, type=b.column(n).type) if n == col else b.column(n)
                      for n in names]
            new.append(pa.RecordBatch.from_arrays(arrays, schema=schema))
        batches = new
        what = f"column {col} null"
    elif how == 2:  # two windows in one record batch
        t = pa.Table.from_batches(batches[:2]).combine_chunks()
        batches = t.to_batches() + batches[2:]
        what = "two rows in one batch"
    else:  # a column dropped
        keep = [n for n in names if n != col]
        schema = pa.schema([schema.field(n) for n in keep], metadata=schema.metadata)
        batches = [pa.RecordBatch.from_arrays([b.column(n) for n in keep], schema=schema)
                   for b in batches]
        what = f"column {col} dropped"
    write_batches(root / SHARD0, schema, batches)
    rehash(root)
    return what


def mutate_manifest(rng, root: Path, name: str) -> str:
    mpath = root / "manifest.json"
    manifest = json.loads(mpath.read_text())
    how = int(rng.integers(12))
    entry = manifest["shards"][int(rng.integers(len(manifest["shards"])))]
    outside = root.parent / "outside.arrow"
    if how == 0:
        depth = int(rng.integers(50, 200_000))
        target = ["teacher", "extra", "stats", "packing", "targets"][int(rng.integers(5))]
        manifest[target] = "__DEEP__"
        mpath.write_text(json.dumps(manifest).replace('"__DEEP__"', _deep_json(depth)))
        return f"manifest {target} = {depth}-deep JSON"
    if how == 1:
        field = ["temperature", "k", "vocab_size"][int(rng.integers(3))]
        mpath.write_text(json.dumps(manifest).replace(f'"{field}": {json.dumps(manifest["targets"][field])}',
                                                      f'"{field}": NaN', 1))
        return f"manifest targets.{field} = NaN"
    if how == 2:  # a wrong type somewhere
        path = [["targets"], ["packing"], ["codec"], ["totals"], ["shards"], ["targets", "k"],
                ["targets", "kind"], ["packing", "window"], ["packing", "mode"], ["codec", "name"],
                ["codec", "params"], ["codec", "table"], ["teacher"], ["totals", "windows"]]
        p = path[int(rng.integers(len(path)))]
        values = [None, "x", 3.5, -1, [], {}, True, [1, 2], 2**70]
        v = values[int(rng.integers(len(values)))]
        node = manifest
        for part in p[:-1]:
            node = node[part]
        node[p[-1]] = v
        mpath.write_text(json.dumps(manifest))
        return f"manifest {'.'.join(p)} = {v!r}"
    if how == 3:  # a shard entry field of the wrong type or value
        field = ["name", "windows", "tokens", "valid_rows", "bytes", "target_bytes", "xxh3",
                 "first_window", "last_window"][int(rng.integers(9))]
        values = [None, "x", 3.5, -1, [], 0, 2**64, True, "0" * 16, 10**6]
        entry[field] = values[int(rng.integers(len(values)))]
        mpath.write_text(json.dumps(manifest))
        return f"shard entry {field} = {entry[field]!r}"
    if how == 4:  # a path out of the dataset
        shutil.copyfile(root / entry["name"], outside)
        names = ["../outside.arrow", str(outside), "shards/../../outside.arrow", "/etc/passwd",
                 "../../../../etc/passwd", "shards//shard-00000.arrow", "./" + entry["name"],
                 "shards\\..\\..\\outside.arrow", "shards/shard-00000.arrow\x00"]
        entry["name"] = names[int(rng.integers(len(names)))]
        if rng.random() < 0.5 and manifest["codec"].get("table"):
            manifest["codec"]["table"]["path"] = "../../" + manifest["codec"]["table"]["path"]
        mpath.write_text(json.dumps(manifest))
        return f"shard name {entry['name']!r}"
    if how == 5:  # a symlink out of the dataset
        shutil.copyfile(root / entry["name"], outside)
        (root / entry["name"]).unlink()
        (root / entry["name"]).symlink_to(outside)
        return f"{entry['name']} symlinked outside the dataset"
    if how == 6:  # an entry listed twice
        manifest["shards"].append(dict(entry))
        if rng.random() < 0.5:
            manifest["totals"]["windows"] += entry["windows"]
            manifest["totals"]["tokens"] += entry["tokens"]
            manifest["totals"]["valid_rows"] += entry["valid_rows"]
            manifest["totals"]["shards"] += 1
        mpath.write_text(json.dumps(manifest))
        return "shard entry duplicated"
    if how == 7:  # a mode (or kind, k, vocabulary, codec) relabelled in the manifest only
        section, field, values = [("packing", "mode", ["causal", "document-global"]),
                                  ("targets", "kind", ["sampled", "topk"]),
                                  ("targets", "k", [K - 1, K + 1]),
                                  ("targets", "vocab_size", [V + 1, V * 2]),
                                  ("codec", "name", ["raw", "qrank"])][int(rng.integers(5))]
        manifest[section][field] = values[int(rng.integers(len(values)))]
        mpath.write_text(json.dumps(manifest))
        return f"manifest {section}.{field} = {manifest[section][field]!r}"
    if how == 8:  # undecodable or truncated bytes
        data = mpath.read_bytes()
        if rng.random() < 0.5:
            data = data[:int(rng.integers(len(data)))]
        else:
            pos = int(rng.integers(len(data)))
            data = data[:pos] + b"\xff\xfe" + data[pos:]
        mpath.write_bytes(data)
        return "manifest bytes truncated or undecodable"
    if how == 9:  # a foreign shard (another dataset's) with the manifest rehashed
        other = DATASETS[(DATASETS.index(name) + 1 + int(rng.integers(2))) % len(DATASETS)]
        src = root.parent.parent / "clean" / other / entry["name"]
        shutil.copyfile(src, root / entry["name"])
        rehash(root, entry["name"])
        return f"{entry['name']} replaced by {other}'s, rehashed"
    if how == 10:  # window ranges that overlap or leave the dataset
        entry["first_window"] = int(rng.integers(0, 6))
        entry["last_window"] = entry["first_window"] + int(rng.integers(0, 3))
        mpath.write_text(json.dumps(manifest))
        return f"shard range {entry['first_window']}..{entry['last_window']}"
    # 11: a field dropped
    p = [["targets"], ["packing", "mode"], ["packing", "window"], ["codec", "name"], ["totals"],
         ["shards"], ["format_version"], ["targets", "k"]][int(rng.integers(8))]
    node = manifest
    for part in p[:-1]:
        node = node[part]
    del node[p[-1]]
    mpath.write_text(json.dumps(manifest))
    return f"manifest {'.'.join(p)} dropped"


def mutate_values(rng, root: Path, name: str) -> str:
    """Structure and targets edited after decoding, re-encoded without the writer's checks."""
    import pyarrow as pa

    from kdcache.formats.reader import LogitDataset

    if name != "raw-topk":
        return mutate_qrank_stream(rng, root, name)
    ds = LogitDataset(root)
    schema, batches = read_batches(root / SHARD0)
    j = int(rng.integers(len(batches)))
    w = ds[j]
    tokens, offsets, valid = w.tokens.numpy().copy(), w.doc_offsets.numpy().copy(), w.valid.numpy().copy()
    ids, lp = w.ids.numpy().copy(), w.logprobs.numpy().copy()
    rows = np.flatnonzero(valid)
    r, c = int(rows[int(rng.integers(rows.size))]), int(rng.integers(K))
    how = int(rng.integers(12))
    what = ["NaN log-prob", "+inf log-prob", "-inf log-prob", "positive log-prob", "-1 id",
            "id = vocab", "duplicate id", "unsorted row", "token = vocab", "offsets not rising",
            "valid flag on a document end", "mass above 1"][how]
    if how == 0:
        lp[r, c] = np.nan
    elif how == 1:
        lp[r, c] = np.inf
    elif how == 2:
        lp[r, c] = -np.inf
    elif how == 3:
        lp[r, 0] = 0.5
    elif how == 4:
        ids[r, c] = -1
    elif how == 5:
        ids[r, c] = V
    elif how == 6:
        ids[r, (c + 1) % K] = ids[r, c]
    elif how == 7:
        lp[r] = lp[r][::-1].copy()
    elif how == 8:
        tokens[int(rng.integers(tokens.size))] = V
    elif how == 9 and offsets.size > 2:
        offsets[1], offsets[2] = offsets[2], offsets[1]
    elif how == 10 and offsets.size > 2:
        valid[offsets[1] - 1] = True
    else:
        lp[r] = np.log(np.full(K, 0.5 / K * 3, dtype=np.float32))
    codec = ds.codec
    blob = codec.encode(ids[valid], lp[valid])  # raw: no checks
    b = batches[j]
    token_type = schema.field("tokens").type.value_type

    def lst(values, t):
        return pa.ListArray.from_arrays(pa.array([0, len(values)], type=pa.int32()),
                                        pa.array(values, type=t))

    cols = {"window_index": b.column("window_index"),
            "tokens": lst(np.minimum(tokens, 2**16 - 1).astype(np.uint16), token_type),
            "doc_offsets": lst(offsets.astype(np.int32), pa.int32()),
            "doc_ids": b.column("doc_ids"), "doc_pieces": b.column("doc_pieces"),
            "valid": lst(valid, pa.bool_()), "targets": pa.array([blob], type=pa.large_binary())}
    batches[j] = pa.RecordBatch.from_arrays([cols[n] for n in schema.names], schema=schema)
    write_batches(root / SHARD0, schema, batches)
    rehash(root)
    return f"window {j} row {r}: {what}"


MUTATORS = {"bytes": mutate_bytes, "qrank-header": mutate_qrank_header,
            "qrank-table": mutate_qrank_table, "qrank-stream": mutate_qrank_stream,
            "codec-table": mutate_codec_table, "arrow-meta": mutate_arrow_meta,
            "arrow-columns": mutate_arrow_columns, "manifest": mutate_manifest,
            "values": mutate_values}


# -- one case ------------------------------------------------------------------------------------

SEED = 20261201


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def _escape(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def run_case(case: int, clean: Path, scratch: Path) -> dict:
    from kdcache.errors import KdcacheError
    from kdcache.formats.reader import LogitDataset
    from kdcache.formats.validate import validate_window
    from kdcache.formats.verify import preflight, verify_dataset
    from kdcache.formats.window import WindowRecord

    rng = np.random.default_rng([SEED, case])
    name = DATASETS[int(rng.integers(len(DATASETS)))]
    family = FAMILIES[int(rng.integers(len(FAMILIES)))]
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    work = scratch / "ds"
    shutil.copytree(clean / name, work)
    before = _files(work)
    what = MUTATORS[family](rng, work, name)
    out = {"case": case, "dataset": name, "family": family, "what": what,
           "changed": _files(work) != before, "escapes": []}

    try:
        report = verify_dataset(work)
        out["verify"] = "ok" if report.ok else "refused"
    except BaseException as exc:  # verify must report, never raise
        out["verify"] = "raised"
        out["escapes"].append("verify " + _escape(exc))

    # The oracle: read every window as a trainer would and apply the writer's own checks.
    invalid = False
    try:
        ds = LogitDataset(work)
        for i in range(len(ds)):
            w = ds[i]
            values = w.logprobs if w.logprobs is not None else w.weights
            validate_window(WindowRecord(window_index=w.window_index, tokens=w.tokens.numpy(),
                                         doc_offsets=w.doc_offsets.numpy(), valid=w.valid.numpy(),
                                         ids=w.ids.numpy(), values=values.numpy(),
                                         doc_ids=w.doc_ids.numpy(),
                                         doc_pieces=w.doc_pieces.numpy()),
                            ds.header, where=f"window {i}")
        out["reader"] = "ok"
    except KdcacheError as exc:
        invalid = True
        out["reader"] = type(exc).__name__
    except BaseException as exc:
        invalid = True
        out["reader"] = "escaped"
        out["escapes"].append("reader " + _escape(exc))

    try:
        preflight(LogitDataset(work))
        out["preflight"] = "ok"
    except KdcacheError as exc:
        out["preflight"] = type(exc).__name__
    except BaseException as exc:
        out["preflight"] = "escaped"
        out["escapes"].append("preflight " + _escape(exc))

    out["invalid"] = invalid
    out["missed"] = invalid and out["verify"] == "ok"  # verify passed a dataset with a bad window
    return out


def worker(start: int, stop: int, base: Path) -> None:
    clean = base / "clean"
    if not clean.exists():
        for name in DATASETS:
            build(clean / name, name)
    for case in range(start, stop):
        try:
            result = run_case(case, clean, base / f"case-{os.getpid()}")
        except BaseException as exc:  # a bug in the fuzz itself, not in kdcache: report it
            result = {"case": case, "harness_error": traceback.format_exc()[-2000:],
                      "escapes": [], "what": _escape(exc)}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


# -- the driver: workers under limits, crashes and hangs counted ---------------------------------

def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


class _Slot:
    """One worker subprocess working through cases [next, stop)."""

    def __init__(self, next_case: int, stop: int, base: Path) -> None:
        self.next, self.stop, self.base = next_case, stop, base
        self.proc: subprocess.Popen | None = None
        self.buf = b""
        self.deadline = 0.0

    def start(self) -> None:
        self.err = open(self.base / f"stderr-{self.next}.txt", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.formats.fuzz_shards", "--worker", str(self.next),
             str(self.stop), str(self.base)], stdout=subprocess.PIPE, stderr=self.err,
            preexec_fn=_limit_memory)
        self.buf = b""
        self.deadline = time.monotonic() + 300 + CASE_TIMEOUT_S  # imports, jit cache, datasets


def drive(cases: int, workers: int, first: int = 0) -> dict:
    base = Path(tempfile.mkdtemp(prefix="kdcache-fuzz-"))
    for name in DATASETS:  # built once, shared by the workers
        build(base / "clean" / name, name)
    per = -(-cases // workers)
    slots = [_Slot(first + i * per, min(first + (i + 1) * per, first + cases), base)
             for i in range(workers)]
    results: list[dict] = []
    t0 = time.monotonic()
    try:
        for s in slots:
            if s.next < s.stop:
                s.start()
        while any(s.proc for s in slots):
            live = {s.proc.stdout.fileno(): s for s in slots if s.proc}
            ready, _, _ = select.select(list(live), [], [], 1.0)
            for fd in ready:
                s = live[fd]
                chunk = os.read(fd, 1 << 16)
                s.buf += chunk
                while b"\n" in s.buf:
                    line, s.buf = s.buf.split(b"\n", 1)
                    r = json.loads(line)
                    results.append(r)
                    s.next = r["case"] + 1
                    s.deadline = time.monotonic() + CASE_TIMEOUT_S
                if not chunk:  # the worker exited: done, or died inside case s.next
                    rc = s.proc.wait()
                    s.proc = None
                    if s.next < s.stop:
                        results.append({"case": s.next, "crash": rc, "escapes": [],
                                        "stderr": _tail(s.base / f"stderr-{s.next}.txt")})
                        s.next += 1
                        if s.next < s.stop:
                            s.start()
            for s in slots:
                if s.proc and time.monotonic() > s.deadline:
                    s.proc.kill()
                    s.proc.wait()
                    s.proc = None
                    results.append({"case": s.next, "hang": True, "escapes": []})
                    s.next += 1
                    if s.next < s.stop:
                        s.start()
    finally:
        for s in slots:
            if s.proc:
                s.proc.kill()
                s.proc.wait()
        shutil.rmtree(base, ignore_errors=True)
    return figures(results, time.monotonic() - t0)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


def figures(results: list[dict], seconds: float) -> dict:
    done = [r for r in results if "verify" in r]
    escapes = Counter(e.split(":")[0] for r in results for e in r["escapes"])
    return {
        "cases": len(results),
        "seconds": round(seconds, 1),
        "crashes": sum(1 for r in results if "crash" in r),
        "hangs": sum(1 for r in results if r.get("hang")),
        "harness_errors": sum(1 for r in results if "harness_error" in r),
        "non_kdcache_exceptions": sum(escapes.values()),
        "escapes_by_type": dict(escapes),
        "verify_missed_invalid": sum(1 for r in done if r["missed"]),
        "changed": sum(1 for r in done if r["changed"]),
        "invalid": sum(1 for r in done if r["invalid"]),
        "verify": dict(Counter(r["verify"] for r in done)),
        "reader": dict(Counter(r["reader"] for r in done)),
        "preflight": dict(Counter(r["preflight"] for r in done)),
        "by_family": {f: dict(Counter(f"verify {r['verify']}" for r in done if r["family"] == f))
                      for f in FAMILIES},
        "passed_changes": sorted(Counter(f"{r['family']}: {r['what'][:60]}" for r in done
                                         if r["verify"] == "ok" and r["changed"]).items())[:40],
        "failures": [r for r in results if "crash" in r or r.get("hang") or r["escapes"]
                     or r.get("missed") or "harness_error" in r][:20],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(int(argv[1]), int(argv[2]), Path(argv[3]))
        return 0
    if argv and argv[0] == "--replay":  # one case in this process, tracebacks shown
        base = Path(tempfile.mkdtemp(prefix="kdcache-fuzz-"))
        for name in DATASETS:
            build(base / "clean" / name, name)
        for case in argv[1:]:
            print(json.dumps(run_case(int(case), base / "clean", base / "case")))
        shutil.rmtree(base, ignore_errors=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=10_000, help="mutated datasets to try")
    p.add_argument("--first", type=int, default=0, help="first case number (replay a range)")
    p.add_argument("--workers", type=int, default=2, help="worker subprocesses")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    figs = drive(args.cases, args.workers, args.first)
    line = json.dumps(figs)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    bad = (figs["crashes"] or figs["hangs"] or figs["non_kdcache_exceptions"]
           or figs["verify_missed_invalid"] or figs["harness_errors"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
