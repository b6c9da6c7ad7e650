"""Object storage (s3://, gs://, any remote fsspec backend): clear errors, retries, a shard cache.

fsspec backends raise their own exceptions (botocore's EndpointConnectionError, PermissionError
with the server's one-word reason, FileNotFoundError for a missing bucket). `guard(fs)` wraps a
remote filesystem so that every call kdcache makes retries transient network failures with
exponential backoff and then fails with a StorageError naming the URL and the likely cause.

Credentials and endpoints come from the backend's usual sources: for S3, the AWS environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL, ...) and ~/.aws/config,
as botocore reads them; kdcache never takes a secret on its command line.

`ShardCache` keeps verified local copies of remote shards on disk, least recently used first out,
so that training reads a remote dataset at local-disk speed while holding a bounded amount of it.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from typing import Any, Callable

import fsspec

from kdcache.errors import KdcacheError

log = logging.getLogger(__name__)

RETRIES_ENV = "KDCACHE_REMOTE_RETRIES"
BACKOFF_ENV = "KDCACHE_REMOTE_BACKOFF_S"
CACHE_DIR_ENV = "KDCACHE_CACHE_DIR"
CACHE_BYTES_ENV = "KDCACHE_CACHE_BYTES"
DEFAULT_CACHE_BYTES = 16 << 30


class RemoteStorageError(KdcacheError):
    """Object storage could not be reached or refused the request."""


def _transient(exc: BaseException) -> bool:
    """Network failures worth retrying: refused/reset connections and timeouts."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # another backend: only the standard library's notion applies
        return isinstance(exc, (ConnectionError, TimeoutError))
    return isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError))


def describe(exc: BaseException, where: str) -> RemoteStorageError | None:
    """A RemoteStorageError for a backend exception, or None for one kdcache does not explain."""
    if isinstance(exc, KdcacheError):
        return None
    if _transient(exc):
        return RemoteStorageError(
            f"{where}: cannot reach the object store ({exc}); the connection was refused, "
            "dropped or timed out after retries. Check the endpoint (AWS_ENDPOINT_URL) and the "
            "network; an interrupted dump resumes when run again")
    if isinstance(exc, PermissionError):
        return RemoteStorageError(
            f"{where}: access denied by the object store ({exc}); check the credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket policy")
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return RemoteStorageError(f"{where}: no credentials found for the object store ({exc})")
    if isinstance(exc, FileNotFoundError):
        text = str(exc)
        if "bucket" in text.lower():
            return RemoteStorageError(f"{where}: {text} (kdcache never creates buckets)")
        return RemoteStorageError(f"{where}: not found ({text})")
    if isinstance(exc, OSError):
        return RemoteStorageError(f"{where}: object store error: {exc}")
    return None


def _settings() -> tuple[int, float]:
    try:
        retries = int(os.environ.get(RETRIES_ENV, "4"))
        backoff = float(os.environ.get(BACKOFF_ENV, "0.5"))
    except ValueError:
        raise KdcacheError(f"{RETRIES_ENV} must be an integer and {BACKOFF_ENV} a number") from None
    return max(0, retries), max(0.0, backoff)


def with_retries(call: Callable[..., Any], where: str, *args: Any, **kwargs: Any) -> Any:
    """Run `call`, retrying transient failures with exponential backoff; errors become
    RemoteStorageError. Every call kdcache routes here is idempotent (reads, whole-object
    writes, listings)."""
    retries, backoff = _settings()
    for attempt in range(retries + 1):
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - translated or re-raised below
            if _transient(exc) and attempt < retries:
                delay = backoff * (2 ** attempt)
                log.warning("%s: %s; retrying in %.1f s (%d/%d)", where, exc, delay,
                            attempt + 1, retries)
                time.sleep(delay)
                continue
            err = describe(exc, where)
            if err is None:
                raise
            raise err from exc
    raise AssertionError("unreachable")


BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})

# Methods kdcache calls whose failures should be explained; everything else passes through.
_GUARDED = frozenset({"exists", "ls", "info", "size", "cat_file", "pipe_file", "get_file",
                      "put_file", "rm", "rm_file", "find", "isdir", "isfile", "open", "mv"})


class GuardedFileSystem:
    """A remote fsspec filesystem whose calls retry transient failures and raise kdcache errors.

    Object stores have no directories: `makedirs` is a no-op here, so that a mistyped bucket
    is reported as missing instead of created (s3fs creates a bucket on makedirs)."""

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self._fs = fs

    @property
    def wrapped(self) -> fsspec.AbstractFileSystem:
        return self._fs

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if name not in _GUARDED or not callable(attr):
            return attr

        @functools.wraps(attr)
        def guarded(path, *args, **kwargs):
            return with_retries(attr, f"{self.url(path)}", path, *args, **kwargs)
        return guarded

    def url(self, path: str) -> str:
        return self._fs.unstrip_protocol(path) if isinstance(path, str) else str(path)

    def __reduce__(self):
        return GuardedFileSystem, (self._fs,)


def guard(fs: fsspec.AbstractFileSystem) -> GuardedFileSystem:
    return fs if isinstance(fs, GuardedFileSystem) else GuardedFileSystem(fs)


def check_root(fs: GuardedFileSystem, path: str) -> None:
    """Before anything is written to a remote root: its bucket exists and answers with these
    credentials. The root itself is listed (not the bucket: a user may hold rights on a prefix
    only); a root that does not exist yet is fine, a missing bucket is not."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if not BUCKET_PROTOCOLS.intersection(protocols):
        return  # memory://, http:// ...: no bucket to check
    try:
        with_retries(fs.wrapped.ls, fs.url(path), path, detail=False)
    except RemoteStorageError as err:
        cause = err.__cause__
        if isinstance(cause, FileNotFoundError) and "bucket" not in str(cause).lower():
            return  # an empty prefix: the dataset is yet to be written
        raise


def discard_upload(raw: Any) -> None:
    """Abandon a remote file opened for writing without publishing it. fsspec's buffered files
    commit on close (and on garbage collection), so a failed write must be discarded and marked
    closed, or a truncated object would appear under its final name."""
    discard = getattr(raw, "discard", None)
    if discard is not None:
        try:
            discard()  # s3fs aborts its multipart upload here
        except Exception as exc:  # noqa: BLE001 - the original failure matters more
            log.warning("could not abort an unfinished upload: %s", exc)
    try:
        raw.closed = True  # fsspec buffered files: never commit on garbage collection
    except AttributeError:
        pass  # io-based files (memory://) publish on close only, which never happens


class ShardCache:
    """Verified local copies of remote shards, keyed by content hash, evicted LRU by bytes."""

    def __init__(self, directory: str | os.PathLike | None = None,
                 max_bytes: int | None = None) -> None:
        if directory is None:
            directory = os.environ.get(CACHE_DIR_ENV) or os.path.join(
                os.path.expanduser("~"), ".cache", "kdcache", "shards")
        if max_bytes is None:
            try:
                max_bytes = int(os.environ.get(CACHE_BYTES_ENV, DEFAULT_CACHE_BYTES))
            except ValueError:
                raise KdcacheError(f"{CACHE_BYTES_ENV} must be an integer number of bytes") \
                    from None
        if max_bytes <= 0:
            raise KdcacheError(f"shard cache size must be positive, got {max_bytes}")
        self.directory = os.fspath(directory)
        self.max_bytes = int(max_bytes)
        os.makedirs(self.directory, exist_ok=True)

    def _entries(self) -> list[tuple[float, int, str]]:
        out = []
        for name in os.listdir(self.directory):
            if not name.endswith(".arrow"):
                continue
            p = os.path.join(self.directory, name)
            try:
                st = os.stat(p)
            except FileNotFoundError:  # another process evicted it
                continue
            out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def bytes_used(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def path_for(self, xxh3: str, size: int) -> str:
        if not all(c in "0123456789abcdef" for c in xxh3) or not xxh3:
            raise KdcacheError(f"invalid shard hash {xxh3!r} in the manifest")
        return os.path.join(self.directory, f"{xxh3}-{size}.arrow")

    def fetch(self, fs: GuardedFileSystem, remote_path: str, xxh3: str, size: int) -> str:
        """Local path of the shard with this hash and size, downloading it if not cached. The
        caller verifies the content (a corrupt remote copy is reported, not cached twice)."""
        if size > self.max_bytes:
            raise KdcacheError(f"{fs.url(remote_path)}: shard of {size:,} bytes does not fit the "
                               f"local shard cache of {self.max_bytes:,} bytes "
                               f"(raise {CACHE_BYTES_ENV})")
        local = self.path_for(xxh3, size)
        if os.path.exists(local):
            os.utime(local)  # most recently used
            return local
        self._make_room(size)
        tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            fs.get_file(remote_path, tmp)
            os.replace(tmp, local)  # readers in other processes see whole files only
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return local

    def _make_room(self, incoming: int) -> None:
        entries = self._entries()
        used = sum(size for _, size, _ in entries)
        for _, size, p in entries:
            if used + incoming <= self.max_bytes:
                break
            try:
                os.remove(p)  # an open memory map keeps its pages until the reader closes
            except FileNotFoundError:
                pass
            used -= size

    def evict(self, xxh3: str, size: int) -> None:
        try:
            os.remove(self.path_for(xxh3, size))
        except FileNotFoundError:
            pass
