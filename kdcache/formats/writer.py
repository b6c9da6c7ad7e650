"""Writing datasets: validated targets -> codec -> Arrow IPC shards, atomically; manifest last.

Every writer follows one protocol, whether it runs in one process (`DatasetWriter`) or spreads
shards over Ray actors (the teacher dump):

1. `begin_dataset`: fit the codec's dataset-level table (qrank's id ranking, from the first
   window's ids or corpus token counts) and store it as codec/table.bin, atomically, before any
   shard uses it. An interrupted writer resumes with `read_stored_codec_table` instead;
   `remove_stale_temporaries` clears what a killed writer left half-written.
2. `write_shard(root, shard_name(i), windows, header, codec)` for each shard, anywhere (a worker
   rebuilds the codec with `make_codec(header, table)`); it returns the shard's manifest entry.
3. `finish_dataset`: the dataset card, then manifest.json, whose presence marks the dataset
   complete (`dataset_finished`, `read_finished_manifest`).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow.ipc as ipc
import xxhash

from kdcache import __version__
from kdcache.errors import FormatError
from kdcache.formats import storage
from kdcache.formats.card import write_card
from kdcache.formats.codecs import TargetCodec, get_codec, make_codec
from kdcache.formats.codecs.blocks import block_pool
from kdcache.formats.codecs.procs import process_pool
from kdcache.formats.codecs.qrank_procs import encode_window, encodes_in_processes
from kdcache.formats.manifest import (MANIFEST_NAME, SHARD_DIR, TABLE_PATH, DatasetHeader,
                                      ShardInfo, build_manifest, dump_manifest, parse_manifest)
from kdcache.formats.shard import shard_schema, window_batch
from kdcache.formats.validate import validate_window
from kdcache.formats.window import WindowRecord

IPC_OPTIONS = ipc.IpcWriteOptions(compression="zstd")


def shard_name(index: int) -> str:
    """The name of a dataset's index-th shard (its file: `shard_path(shard_name(i))`)."""
    return f"shard-{index:05d}"


def shard_name_of(path: str) -> str:
    """The shard name of a manifest entry's path: "shards/shard-00003.arrow" -> "shard-00003"."""
    return path.rsplit("/", 1)[-1].removesuffix(".arrow")


def shard_path(shard_name: str) -> str:
    """Dataset-relative path of a shard: "shard-00003" -> "shards/shard-00003.arrow"."""
    if "/" in shard_name or not shard_name or shard_name.startswith("."):
        raise ValueError(f"invalid shard name {shard_name!r}")
    return f"{SHARD_DIR}/{shard_name}.arrow"


def prepare_codec(header: DatasetHeader, *, token_counts: np.ndarray | None = None,
                  sample_ids: np.ndarray | None = None) -> TargetCodec:
    """Build the codec's dataset-level table (if it uses one) from what is known up front."""
    cls = get_codec(header.codec)
    table = cls.build_table(vocab_size=header.vocab_size, token_counts=token_counts,
                            sample_ids=sample_ids)
    return make_codec(header, table)


def begin_dataset(root: str, header: DatasetHeader, codec: TargetCodec | None = None, *,
                  token_counts: np.ndarray | None = None,
                  sample_ids: np.ndarray | None = None) -> TargetCodec:
    """Step 1 of writing a dataset: fit the codec's table (unless `codec` is given, already
    fitted) and store it as codec/table.bin, atomically, before any shard is coded with it."""
    if codec is None:
        codec = prepare_codec(header, token_counts=token_counts, sample_ids=sample_ids)
    if codec.table is not None:
        fs, base = storage.resolve(root)
        storage.atomic_write_bytes(fs, storage.join(base, TABLE_PATH), codec.table)
    return codec


def _table_entry(table: bytes | None) -> dict[str, Any] | None:
    """The manifest's entry for a codec table stored as codec/table.bin (None without one)."""
    if table is None:
        return None
    return {"path": TABLE_PATH, "bytes": len(table), "xxh3": xxhash.xxh3_64(table).hexdigest()}


def read_stored_codec_table(root: str) -> bytes | None:
    """The codec table an earlier (interrupted) writer stored in `root`, if any."""
    fs, base = storage.resolve(root)
    path = storage.join(base, TABLE_PATH)
    return storage.read_bytes(fs, path) if fs.exists(path) else None


ENCODE_WORKERS_ENV = "KDCACHE_ENCODE_WORKERS"
MAX_DEFAULT_ENCODE_WORKERS = 16
WINDOWS_ENCODING = 4  # windows validated/encoded at once; each spreads over the workers


def default_encode_workers() -> int:
    """Workers that validate and encode while the caller produces the next windows:
    KDCACHE_ENCODE_WORKERS, else this process's CPUs, up to 16 (BENCHMARKS.md, "Writer:
    encoding in worker processes"; bench/bench_encode.py)."""
    env = os.environ.get(ENCODE_WORKERS_ENV)
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"{ENCODE_WORKERS_ENV} must be an integer, got {env!r}") from None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_ENCODE_WORKERS, cpus))


def _encoded(windows: Iterable[WindowRecord], header: DatasetHeader, codec: TargetCodec,
             where: str, workers: int,
             processes: bool) -> Iterator[tuple[WindowRecord, int, bytes]]:
    """(record, valid rows, blob) in input order. With workers > 1, each window's rows are
    validated and encoded in blocks: qrank top-k windows of two blocks or more on `workers`
    processes (qrank_procs; their streams' column blocks and zstd on as many threads), other
    windows on the process's pool of `workers` threads (processes=False: every window);
    up to WINDOWS_ENCODING windows at once (2 x that queued) while `windows` (a teacher, say)
    produces the next."""
    threads = block_pool(workers)

    def prepare(rec: WindowRecord) -> tuple[WindowRecord, int, bytes]:
        if processes and workers > 1 and encodes_in_processes(codec, header, rec):
            rows, blob = encode_window(codec, rec, header, where, process_pool(workers),
                                       threads)
            return rec, rows, blob
        ids, values = validate_window(rec, header, where=where, pool=threads)
        return rec, ids.shape[0], codec.encode(ids, values, pool=threads)

    if workers <= 1:
        yield from map(prepare, windows)
        return
    at_once = min(workers, WINDOWS_ENCODING)
    with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="kdcache-encode") as windows_pool:
        pending: deque = deque()
        try:
            for rec in windows:
                pending.append(windows_pool.submit(prepare, rec))
                while len(pending) > 2 * at_once:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error (or a closed generator) drops what is queued, waits for the rest
            for fut in pending:
                fut.cancel()


def write_shard(root: str, shard_name: str, windows: Iterable[WindowRecord],
                header: DatasetHeader, codec: TargetCodec, *,
                encode_workers: int | None = None, processes: bool = True) -> ShardInfo:
    """Validate, encode and write one shard atomically; returns its manifest entry. Windows are
    validated and encoded by `encode_workers` workers (default_encode_workers(); processes, or
    threads with processes=False: the same bytes either way) and written in input order."""
    if codec.name != header.codec or codec.k != header.k or codec.kind != header.kind:
        raise ValueError(f"codec ({codec.name}, k={codec.k}, {codec.kind}) does not match the "
                         f"header ({header.codec}, k={header.k}, {header.kind})")
    workers = default_encode_workers() if encode_workers is None else max(1, int(encode_workers))
    where = storage.join(root, shard_path(shard_name))
    return write_encoded_shard(root, shard_name,
                               _encoded(windows, header, codec, where, workers, processes),
                               header)


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


def finish_dataset(root: str, header: DatasetHeader, shards: list[ShardInfo], *,
                   table: bytes | None = None,
                   stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the dataset card (README.md and its figure), then manifest.json (last: its presence
    marks a complete dataset). `table` is the codec table the shards were coded with
    (begin_dataset stored it).

    The manifest records every codec parameter, the codec's defaults included, so that a later
    kdcache with other defaults still decodes it."""
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise FormatError(f"{root}: duplicate shard names in the manifest")
    fs, base = storage.resolve(root)
    header = replace(header, codec_params=make_codec(header, table).config())
    manifest = build_manifest(header, shards, table=_table_entry(table), stats=stats,
                              created_by=f"kdcache {__version__}")
    write_card(root, manifest)
    storage.atomic_write_bytes(fs, storage.join(base, MANIFEST_NAME), dump_manifest(manifest))
    return manifest


def dataset_finished(root: str) -> bool:
    """Whether `root` holds a finished dataset (its manifest.json)."""
    fs, base = storage.resolve(root)
    return fs.exists(storage.join(base, MANIFEST_NAME))


def read_finished_manifest(root: str) -> dict[str, Any]:
    """The parsed manifest.json of the finished dataset in `root`."""
    fs, base = storage.resolve(root)
    path = storage.join(base, MANIFEST_NAME)
    return parse_manifest(storage.read_bytes(fs, path), where=path)


def remove_stale_temporaries(root: str) -> int:
    """Remove the half-written shard files an interrupted writer left; returns how many."""
    fs, base = storage.resolve(root)
    return storage.remove_stale_temporaries(fs, storage.join(base, SHARD_DIR))


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
        if dataset_finished(self.root) and not overwrite:
            raise FormatError(f"{self.root}: already holds a finished dataset (manifest.json); "
                              "choose another directory or pass overwrite=True")
        remove_stale_temporaries(self.root)
        # Without a codec, it is built at the first window: a codec's dataset-level table (the
        # id frequency ranking) is best fitted on the teacher's own first targets.
        self.codec: TargetCodec | None = None
        if codec is not None:
            self.codec = begin_dataset(self.root, header, codec)
        self.shards: list[ShardInfo] = []
        self._pending: list[WindowRecord] = []

    def add(self, rec: WindowRecord) -> None:
        if self.codec is None:
            ids, _ = validate_window(rec, self.header, where=f"{self.root} (first window)")
            self.codec = begin_dataset(self.root, self.header, token_counts=self.token_counts,
                                       sample_ids=ids)
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
        name = shard_name(len(self.shards))
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
        return finish_dataset(self.root, self.header, self.shards, table=self.codec.table,
                              stats=stats)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
