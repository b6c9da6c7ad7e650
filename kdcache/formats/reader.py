"""Reading datasets: manifest -> shard -> window, as torch tensors.

`open_dataset(path_or_url)` checks the manifest (format, major version, fields); each shard is
checked when first opened (size against the manifest, Arrow magic, xxh3-64, schema metadata
against the manifest), so a truncated or corrupted copy fails with a message naming the file
instead of feeding garbage to a student. Works on local paths (memory-mapped) and fsspec URLs.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import xxhash

from kdcache.errors import FormatError
from kdcache.formats import storage
from kdcache.formats.manifest import (MANIFEST_NAME, DatasetHeader, ShardInfo, parse_manifest)
from kdcache.formats.remote import ShardCache
from kdcache.formats.shard import ARROW_MAGIC, COLUMNS, batch_fields, read_shard_metadata
from kdcache.formats.window import Window
from kdcache.formats.writer import make_codec

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
        if size != info.bytes:
            raise FormatError(f"{path}: size {size} bytes, manifest says {info.bytes} "
                              f"({'truncated' if size < info.bytes else 'extended'} shard)")
        if local_copy or storage.is_local(fs):
            source = pa.memory_map(local_copy or path, "r")
            buffer = source.read_buffer()
        else:
            buffer = pa.py_buffer(storage.read_bytes(fs, path))
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
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise FormatError(f"{path}: cannot open as Arrow IPC file: {exc}") from None
        missing = [c for c in COLUMNS if c not in schema.names]
        if missing:
            raise FormatError(f"{path}: missing columns {missing}")
        meta = read_shard_metadata(schema)
        expected = {"kind": header.kind, "k": str(header.k),
                    "vocab_size": str(header.vocab_size), "codec": header.codec}
        for key, want in expected.items():
            if meta.get(key) != want:
                raise FormatError(f"{path}: shard says {key}={meta.get(key)!r} but the manifest "
                                  f"says {key}={want!r} (shard from another dataset?)")
        if self._file.num_record_batches != info.windows:
            raise FormatError(f"{path}: holds {self._file.num_record_batches} windows, manifest "
                              f"says {info.windows}")

    def __len__(self) -> int:
        return self.info.windows

    def fields(self, j: int) -> dict[str, Any]:
        try:
            batch = self._file.get_batch(j)
            batch.validate(full=True)  # offsets and lengths in bounds before numpy sees them
            return batch_fields(batch)
        except (pa.ArrowException, OSError, ValueError, IndexError) as exc:
            raise FormatError(f"{self.path}: window {j} cannot be read: {exc}") from None

    def token_counts(self) -> np.ndarray:
        out = np.empty(len(self), dtype=np.int64)
        for j in range(len(self)):
            batch = self._file.get_batch(j)
            out[j] = len(batch.column("tokens").flatten())
        return out


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
        self.manifest = parse_manifest(storage.read_bytes(self.fs, manifest_path),
                                       where=manifest_path)
        self.header = DatasetHeader.from_manifest(self.manifest)
        self.shards = [ShardInfo.from_dict(d) for d in self.manifest["shards"]]
        self.codec = make_codec(self.header, self._read_table())
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
        path = storage.join(self.base, entry["path"])
        data = storage.read_bytes(self.fs, path)
        if len(data) != entry["bytes"] or xxhash.xxh3_64(data).hexdigest() != entry["xxh3"]:
            raise FormatError(f"{path}: codec table does not match the manifest (size or xxh3)")
        return data

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

    def _open_shard(self, info: ShardInfo) -> ShardReader:
        path = storage.join(self.base, info.name)
        if self.cache is None:
            return ShardReader(self.fs, path, info, self.header, verify_hash=self.verify_hashes)
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
        return self.decode_window(reader.fields(j), where=f"{reader.path}: window {j}")

    def iter_windows(self) -> Iterator[Window]:
        for i in range(len(self)):
            yield self[i]

    def decode_window(self, f: dict[str, Any], *, where: str) -> Window:
        import torch

        tokens, offsets, valid = f["tokens"], f["doc_offsets"], f["valid"]
        n = tokens.shape[0]
        if valid.shape != (n,) or offsets.shape[0] < 2 or offsets[0] != 0 or offsets[-1] != n:
            raise FormatError(f"{where}: inconsistent window (tokens {n}, valid {valid.shape}, "
                              f"doc_offsets ends {offsets[-1] if offsets.size else None})")
        m = int(valid.sum())
        try:
            ids_v, values_v = self.codec.decode(f["targets"], m)
        except FormatError:
            raise
        except Exception as exc:  # a codec on corrupted bytes: name the place, never crash on
            raise FormatError(f"{where}: targets cannot be decoded: {exc}") from None
        k = self.header.k
        if ids_v.shape != (m, k) or values_v.shape != (m, k):
            raise FormatError(f"{where}: decoded targets have shape {ids_v.shape}, expected "
                              f"({m}, {k})")
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


def open_dataset(root: str | os.PathLike, **kwargs: Any) -> LogitDataset:
    """Open a finished kdcache dataset at a local path or fsspec URL."""
    return LogitDataset(root, **kwargs)
