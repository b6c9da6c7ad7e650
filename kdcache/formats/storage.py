"""Where datasets live: local paths or any fsspec URL, with atomic, verified writes.

Every file a dataset holds becomes visible only when complete. On a local disk it is written to a
temporary name in the same directory, flushed and fsynced, then renamed; a failure midway (full
disk, killed process) leaves at most a `*.tmp-*` file, which readers never look at and the next
writer removes. Object stores have no atomic rename, and need none: an object appears only when
its upload completes (one PUT, or a multipart upload's final "complete" call), so remote files are
written straight to their final key and a failed upload is aborted, never committed. A killed
process leaves no object at all (only unfinished multipart parts, which the store never shows and
a bucket lifecycle rule clears). Remote filesystems are wrapped by `remote.guard`: retries with
backoff for transient network failures, and kdcache errors for everything else.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Iterator

import fsspec
import xxhash

from kdcache.errors import KdcacheError
from kdcache.formats import remote

TMP_MARKER = ".tmp-"


class StorageError(KdcacheError):
    """A file could not be written or read (disk full, permissions, missing path)."""


def resolve(root: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a local path or an fsspec URL such as s3://bucket/ds or memory://x."""
    fs, path = fsspec.core.url_to_fs(os.fspath(root))
    if not is_local(fs):
        fs = remote.guard(fs)
    return fs, path.rstrip("/") or "/"


def check_reachable(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Fail early, before anything is written, when a remote root's bucket is missing or the
    credentials are refused; nothing to check on a local disk."""
    if isinstance(fs, remote.GuardedFileSystem):
        remote.check_root(fs, path)


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


class HashingWriter(io.RawIOBase):
    """A write-only file wrapper that counts bytes and hashes them with xxh3-64 on the way."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.hasher = xxhash.xxh3_64()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        self.hasher.update(view)
        written = self.raw.write(view)
        self.nbytes += len(view)
        return written if written is not None else len(view)

    def tell(self) -> int:
        return self.nbytes

    def flush(self) -> None:
        self.raw.flush()


def _describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return exc.strerror or str(exc)


@contextmanager
def atomic_writer(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[HashingWriter]:
    """Yield a HashingWriter onto a temporary file; rename it to `path` only on success (on an
    object store: onto the final key, published only when the upload completes)."""
    if not is_local(fs):
        with _remote_writer(fs, path) as writer:
            yield writer
        return
    parent = path.rsplit("/", 1)[0]
    tmp = f"{path}{TMP_MARKER}{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, "wb") as raw:
            writer = HashingWriter(raw)
            yield writer
            raw.flush()
            if is_local(fs):
                os.fsync(raw.fileno())
        fs.mv(tmp, path)
        if is_local(fs):
            _fsync_dir(parent)
    except OSError as exc:
        _remove_quietly(fs, tmp)
        raise StorageError(f"{path}: write failed: {_describe_os_error(exc)}; "
                           "no partial file was left visible") from exc
    except BaseException:
        _remove_quietly(fs, tmp)
        raise


@contextmanager
def _remote_writer(fs, path: str) -> Iterator[HashingWriter]:
    raw = fs.open(path, "wb")
    try:
        writer = HashingWriter(raw)
        yield writer
        raw.close()  # the upload completes here; s3fs and botocore retry its requests
    except BaseException as exc:
        remote.discard_upload(raw)
        err = remote.describe(exc, fs.url(path)) if isinstance(exc, Exception) else None
        if err is not None:
            raise err from exc
        raise


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> str:
    """Write `data` atomically to `path`; return its xxh3-64 hex digest."""
    with atomic_writer(fs, path) as out:
        out.write(data)
    return out.hasher.hexdigest()


@contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a temporary local directory beside `path`; once the block succeeds it replaces
    whatever `path` held, in one rename, so `path` is never seen half-written."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{os.path.basename(path)}{TMP_MARKER}", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"{path}: file not found") from None
    except OSError as exc:
        raise StorageError(f"{path}: read failed: {_describe_os_error(exc)}") from exc


def remove_stale_temporaries(fs: fsspec.AbstractFileSystem, directory: str) -> int:
    """Remove `*.tmp-*` files left by interrupted writers; returns how many."""
    if not fs.exists(directory):
        return 0
    stale = [p for p in fs.ls(directory, detail=False) if TMP_MARKER in p.rsplit("/", 1)[-1]]
    for p in stale:
        _remove_quietly(fs, p)
    return len(stale)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path)
    except (OSError, KdcacheError):
        pass
