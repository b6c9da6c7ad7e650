"""Writing datasets: validated targets -> codec -> Arrow IPC shards, atomically; manifest last.

Two entry points:
- `write_shard` + `finalize_dataset`: for distributed writers (the dump's Ray actors each write
  whole shards and return ShardInfo; the driver finalises once every shard is in place).
- `DatasetWriter`: a single-process writer that rolls shards as windows arrive.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow.ipc as ipc
import xxhash

from kdcache import __version__
from kdcache.errors import FormatError
from kdcache.formats import storage
from kdcache.formats.card import write_card
from kdcache.formats.codecs import TargetCodec, get_codec
from kdcache.formats.manifest import (MANIFEST_NAME, SHARD_DIR, TABLE_PATH,
                                      DatasetHeader, ShardInfo, build_manifest, dump_manifest)
from kdcache.formats.shard import shard_schema, window_batch
from kdcache.formats.validate import validate_window
from kdcache.formats.window import WindowRecord

IPC_OPTIONS = ipc.IpcWriteOptions(compression="zstd")


def shard_path(shard_name: str) -> str:
    """Dataset-relative path of a shard: "shard-00003" -> "shards/shard-00003.arrow"."""
    if "/" in shard_name or not shard_name or shard_name.startswith("."):
        raise ValueError(f"invalid shard name {shard_name!r}")
    return f"{SHARD_DIR}/{shard_name}.arrow"


def make_codec(header: DatasetHeader, table: bytes | None = None) -> TargetCodec:
    """The codec instance a dataset's header describes (with its dataset-level table, if any).

    The header's codec_params are completed with the codec's defaults, so that a manifest
    records every parameter and a later kdcache with other defaults still decodes it."""
    cls = get_codec(header.codec)
    codec = cls(kind=header.kind, k=header.k, vocab_size=header.vocab_size, table=table,
                **header.codec_params)
    header.codec_params = codec.config()
    return codec


def prepare_codec(header: DatasetHeader, *, token_counts: np.ndarray | None = None,
                  sample_ids: np.ndarray | None = None) -> TargetCodec:
    """Build the codec's dataset-level table (if it uses one) from what is known up front."""
    cls = get_codec(header.codec)
    table = cls.build_table(vocab_size=header.vocab_size, token_counts=token_counts,
                            sample_ids=sample_ids)
    return make_codec(header, table)


def codec_table_entry(table: bytes | None) -> dict[str, Any] | None:
    """The manifest's entry for a codec table stored as codec/table.bin (None without one)."""
    if table is None:
        return None
    return {"path": TABLE_PATH, "bytes": len(table), "xxh3": xxhash.xxh3_64(table).hexdigest()}


def write_codec_table(root: str, codec: TargetCodec) -> dict[str, Any] | None:
    """Store the codec's table as codec/table.bin; returns its manifest entry."""
    if codec.table is None:
        return None
    fs, base = storage.resolve(root)
    storage.atomic_write_bytes(fs, storage.join(base, TABLE_PATH), codec.table)
    return codec_table_entry(codec.table)


def read_stored_codec_table(root: str) -> bytes | None:
    """The codec table an earlier (interrupted) writer stored in `root`, if any."""
    fs, base = storage.resolve(root)
    path = storage.join(base, TABLE_PATH)
    return storage.read_bytes(fs, path) if fs.exists(path) else None


ENCODE_THREADS_ENV = "KDCACHE_ENCODE_THREADS"


def default_encode_threads() -> int:
    """Threads that validate and encode windows while the caller produces the next ones: the
    codec's numpy, numba (nogil) and zstd work releases the GIL. KDCACHE_ENCODE_THREADS, else
    up to 8 of this process's CPUs (16-core H200 host: 1 thread 72k tokens/s at k=64, 4 threads
    3.0x, 8 threads 4.8x, 12 threads 5.4x; bench/bench_encode.py)."""
    env = os.environ.get(ENCODE_THREADS_ENV)
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"{ENCODE_THREADS_ENV} must be an integer, got {env!r}") from None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _encoded(windows: Iterable[WindowRecord], header: DatasetHeader, codec: TargetCodec,
             where: str, threads: int) -> Iterator[tuple[WindowRecord, np.ndarray, bytes]]:
    """(record, validated ids, blob) in input order. With threads > 1, up to 2 x threads windows
    are validated and encoded in a pool while `windows` (a teacher, say) produces the next."""
    def prepare(rec: WindowRecord) -> tuple[WindowRecord, np.ndarray, bytes]:
        ids, values = validate_window(rec, header, where=where)
        return rec, ids, codec.encode(ids, values)

    if threads <= 1:
        yield from map(prepare, windows)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kdcache-encode") as pool:
        pending: deque = deque()
        try:
            for rec in windows:
                pending.append(pool.submit(prepare, rec))
                while len(pending) > 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error (or a closed generator) drops what is queued, waits for the rest
            for fut in pending:
                fut.cancel()


def write_shard(root: str, shard_name: str, windows: Iterable[WindowRecord],
                header: DatasetHeader, codec: TargetCodec, *,
                encode_threads: int | None = None) -> ShardInfo:
    """Validate, encode and write one shard atomically; returns its manifest entry. Windows are
    validated and encoded by `encode_threads` threads (default_encode_threads()) and written in
    their input order."""
    if codec.name != header.codec or codec.k != header.k or codec.kind != header.kind:
        raise ValueError(f"codec ({codec.name}, k={codec.k}, {codec.kind}) does not match the "
                         f"header ({header.codec}, k={header.k}, {header.kind})")
    threads = default_encode_threads() if encode_threads is None else max(1, int(encode_threads))
    where = storage.join(root, shard_path(shard_name))
    encoded = ((rec, ids.shape[0], blob)
               for rec, ids, blob in _encoded(windows, header, codec, where, threads))
    return write_encoded_shard(root, shard_name, encoded, header)


def write_encoded_shard(root: str, shard_name: str,
                        encoded: Iterable[tuple[WindowRecord, int, bytes]],
                        header: DatasetHeader) -> ShardInfo:
    """Write one shard atomically from windows whose targets are already encoded: (record,
    valid rows, codec blob), the record's ids/values unused. Dataset operations copy blobs this
    way, bit for bit, between datasets that share a codec and its table."""
    fs, base = storage.resolve(root)
    rel = shard_path(shard_name)
    path = storage.join(base, rel)
    schema = shard_schema(header)
    n_windows = tokens = valid_rows = target_bytes = 0
    first = last = None
    with storage.atomic_writer(fs, path) as out:
        with ipc.new_file(out, schema, options=IPC_OPTIONS) as arrow_writer:
            for rec, rows, blob in encoded:
                n = rec.n_tokens
                n_docs = len(rec.doc_offsets) - 1
                doc_ids = rec.doc_ids if rec.doc_ids is not None else np.full(n_docs, -1)
                doc_pieces = rec.doc_pieces if rec.doc_pieces is not None else np.zeros(n_docs)
                arrow_writer.write_batch(window_batch(
                    schema, window_index=rec.window_index, tokens=np.asarray(rec.tokens),
                    doc_offsets=np.asarray(rec.doc_offsets), doc_ids=np.asarray(doc_ids),
                    doc_pieces=np.asarray(doc_pieces), valid=np.asarray(rec.valid), blob=blob))
                n_windows += 1
                tokens += n
                valid_rows += rows
                target_bytes += len(blob) + (n + 7) // 8  # the blob plus the valid bitmap
                first = rec.window_index if first is None else min(first, rec.window_index)
                last = rec.window_index if last is None else max(last, rec.window_index)
            if n_windows == 0:
                raise ValueError(f"{path}: a shard needs at least one window")
    return ShardInfo(name=rel, windows=n_windows, tokens=tokens, valid_rows=valid_rows,
                     bytes=out.nbytes, target_bytes=target_bytes, xxh3=out.hasher.hexdigest(),
                     first_window=int(first), last_window=int(last))


def finalize_dataset(root: str, header: DatasetHeader, shards: list[ShardInfo], *,
                     stats: dict[str, Any] | None = None,
                     table: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the dataset card (README.md and its figure), then manifest.json (last: its presence
    marks a complete dataset)."""
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise FormatError(f"{root}: duplicate shard names in the manifest")
    fs, base = storage.resolve(root)
    manifest = build_manifest(header, shards, table=table, stats=stats,
                              created_by=f"kdcache {__version__}")
    write_card(root, manifest)
    storage.atomic_write_bytes(fs, storage.join(base, MANIFEST_NAME), dump_manifest(manifest))
    return manifest


class DatasetWriter:
    """Single-process writer: `add` windows in order, `close` to finalise.

    Refuses to write into a directory that already holds a finished dataset unless
    `overwrite=True`, so that one team's targets are never mixed with another run's.
    """

    def __init__(self, root: str | os.PathLike, header: DatasetHeader,
                 codec: TargetCodec | None = None, *, windows_per_shard: int = 64,
                 token_counts: np.ndarray | None = None, overwrite: bool = False) -> None:
        self.root = os.fspath(root)
        self.header = header
        self.windows_per_shard = windows_per_shard
        self.token_counts = token_counts
        fs, base = storage.resolve(self.root)
        if fs.exists(storage.join(base, MANIFEST_NAME)) and not overwrite:
            raise FormatError(f"{self.root}: already holds a finished dataset (manifest.json); "
                              "choose another directory or pass overwrite=True")
        storage.remove_stale_temporaries(fs, storage.join(base, SHARD_DIR))
        # Without a codec, it is built at the first window: a codec's dataset-level table (the
        # id frequency ranking) is best fitted on the teacher's own first targets.
        self.codec: TargetCodec | None = None
        self.table_info: dict[str, Any] | None = None
        if codec is not None:
            self._set_codec(codec)
        self.shards: list[ShardInfo] = []
        self._pending: list[WindowRecord] = []

    def _set_codec(self, codec: TargetCodec) -> None:
        self.codec = codec
        self.table_info = write_codec_table(self.root, codec)

    def add(self, rec: WindowRecord) -> None:
        if self.codec is None:
            ids, _ = validate_window(rec, self.header, where=f"{self.root} (first window)")
            self._set_codec(prepare_codec(self.header, token_counts=self.token_counts,
                                          sample_ids=ids))
        if self._pending and isinstance(self._pending[0], tuple):
            self.flush()
        self._pending.append(rec)
        if len(self._pending) >= self.windows_per_shard:
            self.flush()

    def add_encoded(self, rec: WindowRecord, valid_rows: int, blob: bytes) -> None:
        """Add a window whose targets are already encoded with this writer's codec (and table):
        a blob copied from a dataset that shares both. `rec.ids`/`rec.values` are unused."""
        if self.codec is None:
            raise FormatError(f"{self.root}: add_encoded needs the writer's codec up front")
        if self._pending and not isinstance(self._pending[0], tuple):
            self.flush()
        self._pending.append((rec, int(valid_rows), blob))
        if len(self._pending) >= self.windows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{len(self.shards):05d}"
        if isinstance(self._pending[0], tuple):
            info = write_encoded_shard(self.root, name, self._pending, self.header)
        else:
            info = write_shard(self.root, name, self._pending, self.header, self.codec)
        self.shards.append(info)
        self._pending = []

    def close(self, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.codec is None:
            raise FormatError(f"{self.root}: no windows were added; an empty dataset is not written")
        self.flush()
        return finalize_dataset(self.root, self.header, self.shards, stats=stats,
                                table=self.table_info)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
