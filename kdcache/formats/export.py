"""Decoded targets as plain Arrow tables: `kdcache export --format parquet` and the Hugging Face
`datasets` view (kdcache.formats.hf) share `shard_table`.

One row per window: window_index, tokens, doc_offsets, doc_ids, valid, and the decoded targets as
nested lists, one inner list per token: `ids` (int32) and `logprobs` (top-k; descending,
full-vocabulary log-probs) or `weights` (sampled), empty where the row has no target (sampled
rows drop their -1 padding). Nothing kdcache-specific is needed to read it: pandas, polars,
DuckDB and `datasets` read the Parquet files as they are.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.errors import KdcacheError
from kdcache.formats import storage
from kdcache.formats.reader import LogitDataset, open_dataset


def value_column(kind: str) -> str:
    return "logprobs" if kind == "topk" else "weights"


def export_schema(ds: LogitDataset) -> pa.Schema:
    meta = {"kdcache.kind": ds.kind, "kdcache.k": str(ds.k),
            "kdcache.vocab_size": str(ds.vocab_size),
            "kdcache.teacher": str(ds.header.teacher.get("name", "")),
            "kdcache.packing_mode": str(ds.packing.get("mode")),
            "kdcache.row_semantics": "row i: the teacher's distribution for token i+1"}
    return pa.schema([
        ("window_index", pa.int64()), ("tokens", pa.list_(pa.int32())),
        ("doc_offsets", pa.list_(pa.int32())), ("doc_ids", pa.list_(pa.int64())),
        ("valid", pa.list_(pa.bool_())), ("ids", pa.list_(pa.list_(pa.int32()))),
        (value_column(ds.kind), pa.list_(pa.list_(pa.float32()))),
    ], metadata={k.encode(): v.encode() for k, v in meta.items()})


def _nested(rows: list[np.ndarray], keep: list[np.ndarray], dtype, arrow_type) -> pa.Array:
    """[window][token][entry] lists from per-window [n, k] arrays and per-entry keep masks."""
    inner_len = np.concatenate([m.sum(axis=1) for m in keep]).astype(np.int32)
    values = np.concatenate([r[m] for r, m in zip(rows, keep)]).astype(dtype)
    inner = pa.ListArray.from_arrays(np.concatenate([[0], np.cumsum(inner_len)]).astype(np.int32),
                                     pa.array(values, type=arrow_type))
    outer_len = np.array([r.shape[0] for r in rows], dtype=np.int32)
    return pa.ListArray.from_arrays(np.concatenate([[0], np.cumsum(outer_len)]).astype(np.int32),
                                    inner)


def _flat_lists(arrays: list[np.ndarray], arrow_type) -> pa.Array:
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int32)
    return pa.ListArray.from_arrays(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
                                    pa.array(np.concatenate(arrays), type=arrow_type))


def shard_table(ds: LogitDataset, shard: int) -> pa.Table:
    """The decoded windows of one shard as an Arrow table (export_schema)."""
    start = int(ds._starts[shard])
    windows = [ds[start + j] for j in range(ds.shards[shard].windows)]
    ids = [w.ids.numpy() for w in windows]
    vals = [(w.logprobs if w.logprobs is not None else w.weights).numpy() for w in windows]
    keep = [(w.valid.numpy()[:, None] & (i >= 0)) for w, i in zip(windows, ids)]
    schema = export_schema(ds)
    columns = [
        pa.array([w.window_index for w in windows], type=pa.int64()),
        _flat_lists([w.tokens.numpy().astype(np.int32) for w in windows], pa.int32()),
        _flat_lists([w.doc_offsets.numpy().astype(np.int32) for w in windows], pa.int32()),
        _flat_lists([w.doc_ids.numpy().astype(np.int64) for w in windows], pa.int64()),
        _flat_lists([w.valid.numpy() for w in windows], pa.bool_()),
        _nested(ids, keep, np.int32, pa.int32()),
        _nested(vals, keep, np.float32, pa.float32()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def export_parquet(path: str, out: str, *, progress: bool = False) -> dict[str, Any]:
    """Write `path`'s windows as Parquet files `part-00000.parquet`, ... in `out` (one per
    shard, each written atomically)."""
    ds = open_dataset(path)
    fs, base = storage.resolve(out)
    if fs.exists(base) and fs.ls(base, detail=False):
        raise KdcacheError(f"{out}: exists and is not empty; choose another --out")
    shards = range(len(ds.shards))
    if progress:
        from tqdm import tqdm
        shards = tqdm(shards, desc="kdcache export", unit="shard", dynamic_ncols=True)
    total = 0
    for s in shards:
        buf = io.BytesIO()
        pq.write_table(shard_table(ds, s), buf, compression="zstd")
        data = buf.getvalue()
        storage.atomic_write_bytes(fs, storage.join(base, f"part-{s:05d}.parquet"), data)
        total += len(data)
    return {"out": os.fspath(out), "files": len(ds.shards), "windows": len(ds), "bytes": total,
            "columns": export_schema(ds).names}
