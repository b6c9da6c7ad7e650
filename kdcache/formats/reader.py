"""Reading datasets: manifest -> shard -> window, as torch tensors.

A dataset is hostile input (docs/tamper.md). `open_dataset(path_or_url)` checks the manifest
(manifest.parse_manifest: every field, paths confined to the dataset, shard list consistent);
each shard is checked when first opened (inside the dataset, size, Arrow magic, xxh3-64, column
types, its own metadata against the manifest) and each window before it is handed out (Arrow
validation, structure, decoded ids in range), so a truncated, corrupted or forged copy fails with
a kdcache error naming the file instead of feeding garbage to a student, or crashing it. Works
on local paths (memory-mapped) and fsspec URLs.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import xxhash

from kdcache.errors import FormatError, KdcacheError, TargetValidationError
from kdcache.formats import storage
from kdcache.formats.codecs import make_codec
from kdcache.formats.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, DatasetHeader, ShardInfo,
                                      check_relative_path, parse_manifest)
from kdcache.formats.packing import default_valid
from kdcache.formats.remote import ShardCache
from kdcache.formats.shard import (ARROW_MAGIC, COLUMNS, batch_fields, read_shard_metadata,
                                   shard_metadata, shard_schema)
from kdcache.formats.window import Window

_HASH_CHUNK = 64 << 20


class ShardReader:
    """An open, checked shard: random access to its windows' raw fields."""

    def __init__(self, fs, path: str, info: ShardInfo, header: DatasetHeader, *,
                 verify_hash: bool, local_copy: str | None = None) -> None:
        """`local_copy`: a cached download of the remote shard `path`, read in its place
        (messages still name `path`)."""
        self.path = path
        self.info = info
        try:
            size = os.path.getsize(local_copy) if local_copy else fs.size(path)
        except FileNotFoundError:
            raise FormatError(f"{path}: shard listed in the manifest is missing") from None
        except OSError as exc:
            raise FormatError(f"{path}: cannot be read: {exc}") from None
        if size != info.bytes:
            raise FormatError(f"{path}: size {size} bytes, manifest says {info.bytes} "
                              f"({'truncated' if size < info.bytes else 'extended'} shard)")
        try:
            if local_copy or storage.is_local(fs):
                buffer = pa.memory_map(local_copy or path, "r").read_buffer()
            else:
                buffer = pa.py_buffer(storage.read_bytes(fs, path))
        except (OSError, pa.ArrowException) as exc:
            raise FormatError(f"{path}: cannot be read: {exc}") from None
        view = memoryview(buffer)
        if size < 12 or bytes(view[:6]) != ARROW_MAGIC or bytes(view[-6:]) != ARROW_MAGIC:
            raise FormatError(f"{path}: not an Arrow IPC file (magic bytes missing or damaged)")
        if verify_hash:
            digest = _xxh3(view)
            if digest != info.xxh3:
                raise FormatError(f"{path}: content hash xxh3 {digest} does not match the "
                                  f"manifest's {info.xxh3} (corrupted copy)")
        try:
            self._file = ipc.open_file(buffer)
            schema = self._file.schema
            n_batches = self._file.num_record_batches
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise FormatError(f"{path}: cannot open as Arrow IPC file: {exc}") from None
        _check_schema(path, schema, header)
        if n_batches != info.windows:
            raise FormatError(f"{path}: holds {n_batches} windows, manifest says {info.windows}")

    def __len__(self) -> int:
        return self.info.windows

    def _batch(self, j: int) -> pa.RecordBatch:
        """Record batch j, fully validated (offsets and lengths in bounds, no nulls) before numpy
        sees it."""
        try:
            batch = self._file.get_batch(j)
            batch.validate(full=True)
        except (pa.ArrowException, OSError, ValueError, IndexError) as exc:
            raise FormatError(f"{self.path}: window {j} cannot be read: {exc}") from None
        if batch.num_rows != 1:
            raise FormatError(f"{self.path}: window {j}: a window's record batch must have 1 row, "
                              f"has {batch.num_rows}")
        for name in COLUMNS:
            col = batch.column(name)
            if col.null_count or (isinstance(col, pa.ListArray) and col.flatten().null_count):
                raise FormatError(f"{self.path}: window {j}: column {name!r} holds nulls")
        return batch

    def fields(self, j: int) -> dict[str, Any]:
        batch = self._batch(j)
        try:
            f = batch_fields(batch)
        except (pa.ArrowException, OSError, ValueError, IndexError) as exc:
            raise FormatError(f"{self.path}: window {j} cannot be read: {exc}") from None
        self._check_index(j, f["window_index"])
        return f

    def _check_index(self, j: int, index: int) -> None:
        if not self.info.first_window <= index <= self.info.last_window:
            raise FormatError(f"{self.path}: window {j} has window_index {index}, outside the "
                              f"manifest's {self.info.first_window}..{self.info.last_window}")

    def window_index(self, j: int) -> int:
        """Window j's window_index, checked against the manifest's range for this shard."""
        index = int(self._batch(j).column("window_index")[0].as_py())
        self._check_index(j, index)
        return index

    def token_counts(self) -> np.ndarray:
        out = np.empty(len(self), dtype=np.int64)
        for j in range(len(self)):
            out[j] = len(self._batch(j).column("tokens").flatten())
        return out


def _check_schema(path: str, schema: pa.Schema, header: DatasetHeader) -> None:
    """The shard's columns and types, and its own metadata (kind, k, vocabulary, codec, packing
    mode, format major version), must be the manifest's: a shard from another dataset, or a
    manifest relabelled without its shards, is refused."""
    expected = shard_schema(header)
    try:
        names = schema.names
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise FormatError(f"{path}: missing columns {missing}")
        if len(set(names)) != len(names):
            raise FormatError(f"{path}: column names repeat: {names}")
        types = {name: schema.field(name).type for name in COLUMNS}
    except (UnicodeDecodeError, pa.ArrowException, KeyError) as exc:
        raise FormatError(f"{path}: unreadable schema: {exc}") from None
    for name in COLUMNS:
        got, want = types[name], expected.field(name).type
        if got != want:
            raise FormatError(f"{path}: column {name!r} has type {got}, expected {want}")
    try:
        meta = read_shard_metadata(schema)
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from None
    want_meta = {k.decode().split(".", 1)[1]: v.decode() for k, v in shard_metadata(header).items()}
    for key, want in want_meta.items():
        got = meta.get(key)
        if key == "format_version":
            got, want = (got or "").split(".")[0], want.split(".")[0]
        if got != want:
            raise FormatError(f"{path}: shard says {key}={meta.get(key)!r} but the manifest "
                              f"says {key}={want_meta[key]!r} (shard from another dataset, or a "
                              "relabelled manifest?)")


def _xxh3(view: memoryview) -> str:
    h = xxhash.xxh3_64()
    for start in range(0, len(view), _HASH_CHUNK):
        h.update(view[start:start + _HASH_CHUNK])
    return h.hexdigest()


class LogitDataset:
    """A kdcache logit dataset; `ds[i]` is window i (in manifest order) as a `Window`."""

    def __init__(self, root: str | os.PathLike, *, verify_hashes: bool = True,
                 max_open_shards: int = 2, cache: ShardCache | None = None) -> None:
        """On object storage, shards are read through `cache` (a ShardCache from the
        KDCACHE_CACHE_DIR/KDCACHE_CACHE_BYTES environment by default); at most as many are held
        open as fit the cache, so a remote dataset uses at most twice the cache's bytes on disk."""
        self.root = os.fspath(root)
        self.fs, self.base = storage.resolve(self.root)
        storage.check_reachable(self.fs, self.base)
        manifest_path = storage.join(self.base, MANIFEST_NAME)
        if not self.fs.exists(manifest_path):
            raise FormatError(f"{manifest_path}: missing; {self.root} is not a finished kdcache "
                              "dataset (an interrupted dump writes the manifest last)")
        _check_size(self.fs, manifest_path, MAX_MANIFEST_BYTES)
        self.manifest = parse_manifest(storage.read_bytes(self.fs, manifest_path),
                                       where=manifest_path)
        self.header = DatasetHeader.from_manifest(self.manifest)
        self.header.teacher = self._confine_teacher_paths(self.header.teacher)
        self.shards = [ShardInfo.from_dict(d) for d in self.manifest["shards"]]
        table = self._read_table()
        try:
            self.codec = make_codec(self.header, table)
        except (KeyError, ValueError, TypeError, OverflowError, MemoryError) as exc:
            raise FormatError(f"{manifest_path}: codec {self.header.codec!r} with these "
                              f"parameters and table cannot be set up: {exc}") from None
        self.verify_hashes = verify_hashes
        self.max_open_shards = max_open_shards
        self.cache = None
        if not storage.is_local(self.fs):
            self.cache = cache or ShardCache()
            largest = max((s.bytes for s in self.shards), default=1)
            self.max_open_shards = max(1, min(max_open_shards, self.cache.max_bytes // largest))
        counts = np.array([s.windows for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._open: OrderedDict[int, ShardReader] = OrderedDict()
        self._pid = os.getpid()
        self._window_lengths: np.ndarray | None = None

    # -- metadata ---------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.header.kind

    @property
    def k(self) -> int:
        return self.header.k

    @property
    def vocab_size(self) -> int:
        return self.header.vocab_size

    @property
    def packing(self) -> dict[str, Any]:
        return self.header.packing

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def window_lengths(self) -> np.ndarray:
        """Tokens per window (reads the token columns of every shard once)."""
        if self._window_lengths is None:
            self._window_lengths = np.concatenate(
                [self.shard(i).token_counts() for i in range(len(self.shards))]
                or [np.zeros(0, dtype=np.int64)])
        return self._window_lengths

    def _read_table(self) -> bytes | None:
        entry = self.manifest["codec"].get("table")
        if not entry:
            return None
        path = self.path_of(entry["path"])
        _check_size(self.fs, path, entry["bytes"])
        data = storage.read_bytes(self.fs, path)
        if len(data) != entry["bytes"] or xxhash.xxh3_64(data).hexdigest() != entry["xxh3"]:
            raise FormatError(f"{path}: codec table does not match the manifest (size or xxh3)")
        return data

    def _confine_teacher_paths(self, teacher: dict[str, Any]) -> dict[str, Any]:
        """The header's teacher, with `path` / `tokenizer_path` kept only where they lie inside
        this (local) dataset: a trainer reads tokenizer files from there and copies them into the
        student it exports, so a shared manifest must not point it at files elsewhere on the
        machine. A path the dump recorded outside the dataset is dropped (the manifest keeps it
        for display); give the student's tokenizer in the run config instead."""
        teacher = dict(teacher)
        for key in ("path", "tokenizer_path"):
            value = teacher.pop(key, None)
            if not isinstance(value, str) or not value or not storage.is_local(self.fs) \
                    or "\x00" in value:
                continue
            root = os.path.realpath(self.base)
            resolved = os.path.realpath(os.path.join(root, value))  # relative: to the root
            if os.path.commonpath([root, resolved]) == root:
                teacher[key] = resolved
        return teacher

    def path_of(self, relative: str) -> str:
        """The full path of a file the manifest names, confined to the dataset: the name must be
        a plain relative path, and on a local disk it must not resolve (through symlinks) to a
        file outside the dataset root."""
        path = storage.join(self.base, check_relative_path(relative, what="path"))
        if storage.is_local(self.fs):
            root = os.path.realpath(self.base)
            if os.path.commonpath([root, os.path.realpath(path)]) != root:
                raise FormatError(f"{path}: resolves to {os.path.realpath(path)}, outside the "
                                  f"dataset {root} (a symlink out of the dataset is refused)")
        return path

    # -- access ------------------------------------------------------------------------------
    def shard(self, index: int) -> ShardReader:
        if os.getpid() != self._pid:  # forked into a DataLoader worker: reopen, never share
            self._open.clear()
            self._pid = os.getpid()
        reader = self._open.get(index)
        if reader is None:
            reader = self._open_shard(self.shards[index])
            self._open[index] = reader
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(index)
        return reader

    def _open_shard(self, info: ShardInfo, verify_hash: bool | None = None) -> ShardReader:
        """A checked reader of one shard (not kept open); `verify_hash` overrides the dataset's
        setting for a local shard (a downloaded copy is always hash-checked)."""
        path = self.path_of(info.name)
        if self.cache is None:
            return ShardReader(self.fs, path, info, self.header,
                               verify_hash=self.verify_hashes if verify_hash is None
                               else verify_hash)
        local = self.cache.fetch(self.fs, path, info.xxh3, info.bytes)
        try:  # a cached copy is always hash-checked: it came over the network
            return ShardReader(self.fs, self.fs.url(path), info, self.header, verify_hash=True,
                               local_copy=local)
        except FormatError:
            self.cache.evict(info.xxh3, info.bytes)  # never keep a corrupt download
            raise

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for a dataset of {len(self)} windows")
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return s, i - int(self._starts[s])

    def __getitem__(self, i: int) -> Window:
        s, j = self.locate(i)
        reader = self.shard(s)
        f = reader.fields(j)
        return self.decode_window(f, where=f"{reader.path}: window {f['window_index']}")

    def iter_windows(self) -> Iterator[Window]:
        for i in range(len(self)):
            yield self[i]

    def decode_window(self, f: dict[str, Any], *, where: str) -> Window:
        import torch

        tokens, offsets, valid = f["tokens"], f["doc_offsets"], f["valid"]
        _check_structure(f, self.header, where)
        n = tokens.shape[0]
        m = int(valid.sum())
        try:
            ids_v, values_v = self.codec.decode(f["targets"], m)
        except KdcacheError:
            raise
        except Exception as exc:  # a codec on corrupted bytes: name the place, never crash on
            raise FormatError(f"{where}: targets cannot be decoded: {type(exc).__name__}: "
                              f"{exc}") from None
        k = self.header.k
        if ids_v.shape != (m, k) or values_v.shape != (m, k):
            raise FormatError(f"{where}: decoded targets have shape {ids_v.shape}, expected "
                              f"({m}, {k})")
        # Ids index the student's logits downstream (a gather, a Triton kernel): out of range,
        # they would read out of bounds, so they are checked here whatever the codec.
        lowest = 0 if self.kind == "topk" else -1  # sampled rows pad with -1
        if ids_v.size and (int(ids_v.min()) < lowest or int(ids_v.max()) >= self.vocab_size):
            bad = (ids_v < lowest) | (ids_v >= self.vocab_size)
            r = int(np.flatnonzero(bad.any(axis=1))[0])
            raise TargetValidationError(
                f"{where}: row {int(np.flatnonzero(valid)[r])}: id out of range "
                f"[{lowest}, {self.vocab_size}): {int(ids_v[r][bad[r]][0])}")
        ids = np.full((n, k), -1, dtype=np.int32)
        ids[valid] = ids_v
        fill = -np.inf if self.kind == "topk" else 0.0
        values = np.full((n, k), fill, dtype=np.float32)
        values[valid] = values_v
        target = torch.from_numpy(values)
        return Window(
            window_index=f["window_index"],
            tokens=torch.from_numpy(tokens.astype(np.int32)),
            doc_offsets=torch.from_numpy(offsets.astype(np.int32)),
            valid=torch.from_numpy(valid.astype(np.bool_)),
            ids=torch.from_numpy(ids),
            logprobs=target if self.kind == "topk" else None,
            weights=target if self.kind == "sampled" else None,
            doc_ids=torch.from_numpy(f["doc_ids"].astype(np.int64)),
            doc_pieces=torch.from_numpy(f["doc_pieces"].astype(np.int32)),
        )


def _check_size(fs, path: str, limit: int) -> None:
    """Refuse a file larger than the manifest allows before reading it into memory."""
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot be read: {exc}") from None
    if size is not None and size > limit:
        raise FormatError(f"{path}: {size:,} bytes, more than the {limit:,} expected")


def _check_structure(f: dict[str, Any], header: DatasetHeader, where: str) -> None:
    """What every consumer of a window relies on, checked in O(n) before it is handed out:
    tokens in the vocabulary and within the window, document offsets rising from 0 to n, one
    doc id and piece per document, and `valid` off where the packing mode has no target."""
    tokens, offsets, valid = f["tokens"], f["doc_offsets"], f["valid"]
    n = tokens.shape[0]
    window = header.packing["window"]
    if not 0 < n <= window:
        raise FormatError(f"{where}: {n} tokens, outside 1..{window} (the dataset's window)")
    if int(tokens.max()) >= header.vocab_size:
        raise FormatError(f"{where}: token id {int(tokens.max())} is not below the vocabulary "
                          f"size {header.vocab_size}")
    if offsets.shape[0] < 2 or offsets[0] != 0 or offsets[-1] != n \
            or bool(np.any(np.diff(offsets) <= 0)):
        raise FormatError(f"{where}: doc_offsets must rise strictly from 0 to {n} (tokens), got "
                          f"{offsets[:8].tolist()}{'...' if offsets.shape[0] > 8 else ''}")
    docs = offsets.shape[0] - 1
    for name in ("doc_ids", "doc_pieces"):
        if f[name].shape != (docs,):
            raise FormatError(f"{where}: {name} has {f[name].shape[0]} entries for {docs} "
                              "documents")
    if valid.shape != (n,):
        raise FormatError(f"{where}: valid has {valid.shape[0]} flags for {n} tokens")
    mode = header.packing["mode"]
    wrong = valid & ~default_valid(n, offsets, mode)
    if wrong.any():
        raise FormatError(f"{where}: row {int(np.flatnonzero(wrong)[0])} is marked valid but has "
                          f"no target in {mode!r} packing (the last token of the window or of a "
                          "document)")


def open_dataset(root: str | os.PathLike, **kwargs: Any) -> LogitDataset:
    """Open a finished kdcache dataset at a local path or fsspec URL."""
    return LogitDataset(root, **kwargs)
