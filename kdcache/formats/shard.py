"""One shard: an Arrow IPC *file* (FORMAT.md "Shards"), one record batch of one row per window.

The IPC file format (not the stream format) is used because a truncated file fails to open instead
of silently yielding fewer windows. Buffers are zstd-compressed by Arrow itself, so any Arrow
implementation can read tokens and offsets; the teacher targets are one codec blob per window.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from kdcache.errors import FormatError
from kdcache.formats.codecs.base import id_dtype
from kdcache.formats.manifest import FORMAT_VERSION, DatasetHeader

ARROW_MAGIC = b"ARROW1"
META_PREFIX = "kdcache."
COLUMNS = ("window_index", "tokens", "doc_offsets", "doc_ids", "doc_pieces", "valid", "targets")


def token_arrow_type(vocab_size: int) -> pa.DataType:
    return pa.from_numpy_dtype(id_dtype(vocab_size))


def shard_schema(header: DatasetHeader) -> pa.Schema:
    fields = [
        pa.field("window_index", pa.uint64(), nullable=False),
        pa.field("tokens", pa.list_(token_arrow_type(header.vocab_size)), nullable=False),
        pa.field("doc_offsets", pa.list_(pa.int32()), nullable=False),
        pa.field("doc_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("doc_pieces", pa.list_(pa.int32()), nullable=False),
        pa.field("valid", pa.list_(pa.bool_()), nullable=False),
        pa.field("targets", pa.large_binary(), nullable=False),
    ]
    return pa.schema(fields, metadata=shard_metadata(header))


def shard_metadata(header: DatasetHeader) -> dict[bytes, bytes]:
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": header.kind,
        "k": str(header.k),
        "vocab_size": str(header.vocab_size),
        "codec": header.codec,
        "mode": header.packing["mode"],
    }
    return {(META_PREFIX + k).encode(): v.encode() for k, v in meta.items()}


def read_shard_metadata(schema: pa.Schema) -> dict[str, str]:
    """The kdcache.* schema metadata as text; FormatError if a key or value is not UTF-8."""
    out = {}
    for k, v in (schema.metadata or {}).items():
        if not k.startswith(META_PREFIX.encode()):
            continue
        try:
            out[k.decode()[len(META_PREFIX):]] = v.decode()
        except UnicodeDecodeError:
            raise FormatError(f"shard metadata {k[:40]!r} is not valid UTF-8") from None
    return out


def _list_column(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    values = np.ascontiguousarray(values)
    offsets = pa.array(np.array([0, values.shape[0]], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values, type=value_type))


def window_batch(schema: pa.Schema, *, window_index: int, tokens: np.ndarray,
                 doc_offsets: np.ndarray, doc_ids: np.ndarray, doc_pieces: np.ndarray,
                 valid: np.ndarray, blob: bytes) -> pa.RecordBatch:
    token_type = schema.field("tokens").type.value_type
    columns = [
        pa.array([window_index], type=pa.uint64()),
        _list_column(tokens.astype(token_type.to_pandas_dtype(), copy=False), token_type),
        _list_column(doc_offsets.astype(np.int32, copy=False), pa.int32()),
        _list_column(doc_ids.astype(np.int64, copy=False), pa.int64()),
        _list_column(doc_pieces.astype(np.int32, copy=False), pa.int32()),
        _list_column(valid.astype(np.bool_, copy=False), pa.bool_()),
        pa.array([blob], type=pa.large_binary()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def batch_fields(batch: pa.RecordBatch) -> dict[str, Any]:
    """The numpy arrays (and the targets blob as a buffer) of a one-window record batch."""
    if batch.num_rows != 1:
        raise ValueError(f"a window's record batch must have 1 row, has {batch.num_rows}")

    def values(name: str) -> np.ndarray:
        col = batch.column(name)
        return col.flatten().to_numpy(zero_copy_only=False)

    blob_col = batch.column("targets")
    return {
        "window_index": int(batch.column("window_index")[0].as_py()),
        "tokens": values("tokens"),
        "doc_offsets": values("doc_offsets"),
        "doc_ids": values("doc_ids"),
        "doc_pieces": values("doc_pieces"),
        "valid": values("valid"),
        "targets": blob_col[0].as_buffer(),
    }
