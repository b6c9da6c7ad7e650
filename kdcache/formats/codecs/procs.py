"""Encoding worker processes: a window's row blocks encoded beside the writer, off its GIL.

Threads (blocks.py) share one GIL with the writer's own Python and with an in-process teacher
engine's scheduler; past ~4 threads the numpy glue between nogil kernels serialises them
(BENCHMARKS.md, "Writer: encoding in worker processes"). Here each worker is a process of its
own (`python -m kdcache.formats.codecs.procs`, started with subprocess: no fork of a process
that holds CUDA or engine threads, no re-import of the caller's main module):

- Arrays travel as memory, never as objects: a window's arrays live in one anonymous
  memory file (memfd, not /dev/shm, whose size containers often cap), whose descriptor goes to
  the worker with the request (SCM_RIGHTS); both sides map it (`SharedArrays`).
- Requests and replies are small JSON messages on a Unix SEQPACKET socket pair (one message
  per packet); nothing is pickled. A worker answers requests in order.
- Workers keep per-window state between requests (a block's prepared rows), so a window's
  block i always goes to worker i.
- A worker exits when its socket closes: the pool is closed, or the writer's process died
  (the kernel closes its end; a worker busy with a block sees it when it answers). It ignores
  SIGINT (Ctrl-C reaches the whole process group; the writer decides) and runs at nice 5:
  when cores are short, the engine's thread in the writer's process (it keeps the GPU fed)
  goes first. A worker that dies fails its pending requests with an EncodeWorkerError (a
  KdcacheError) naming its exit code; the pool is replaced on next use.
"""

from __future__ import annotations

import atexit
import collections
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import numpy as np

from kdcache.errors import KdcacheError, TargetValidationError

WORKER_NICE = 5  # scheduling weight ~1/3 of the writer's threads when cores are short
MAX_MESSAGE = 1 << 16  # bytes of one JSON message (requests carry names, offsets, shapes)
ALIGN = 64


class EncodeWorkerError(KdcacheError):
    """An encoding worker process failed or died (the message says which and why)."""


# ---------------------------------------------------------------------------- shared arrays


class SharedArrays:
    """Named numpy arrays in one anonymous shared memory file (memfd), zero-filled.

    `create(layout)` in the writer; `spec` (JSON-able) and `fd` go to a worker, which calls
    `attach(fd, spec)`. `close()` unmaps (views must be dropped first; ones still alive keep
    the mapping until they are collected)."""

    def __init__(self, fd: int, spec: list, owner: bool) -> None:
        self.spec = spec
        size = max(ALIGN, max((off + _nbytes(dt, sh) for _, dt, sh, off in spec), default=0))
        if owner:
            os.ftruncate(fd, size)
        self._map = mmap.mmap(fd, size)
        self.fd = fd if owner else -1  # a worker's descriptor is closed by `serve`
        self.arrays = {name: np.ndarray(tuple(shape), dtype=np.dtype(dt), buffer=self._map,
                                        offset=off) for name, dt, shape, off in spec}

    @classmethod
    def create(cls, layout: dict[str, tuple[str, tuple[int, ...]]]) -> "SharedArrays":
        spec, off = [], 0
        for name, (dt, shape) in layout.items():
            spec.append((name, np.dtype(dt).str, [int(x) for x in shape], off))
            off += -(-_nbytes(dt, shape) // ALIGN) * ALIGN
        fd = os.memfd_create("kdcache-encode", os.MFD_CLOEXEC)
        try:
            return cls(fd, spec, owner=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, spec: list) -> "SharedArrays":
        return cls(fd, spec, owner=False)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def close(self) -> None:
        self.arrays.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self._map.close()
        except BufferError:  # a view is still referenced: unmapped once it is collected
            pass

    def __enter__(self) -> "SharedArrays":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    return int(np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64)))


def memfd_of(data: bytes) -> int:
    """A sealed-by-convention memory file holding `data` (a codec table sent to workers)."""
    fd = os.memfd_create("kdcache-table", os.MFD_CLOEXEC)
    os.write(fd, data) if data else None
    return fd


def read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


# ---------------------------------------------------------------------------- the pool


def _worker_env() -> dict[str, str]:
    """The writer's environment, with this kdcache importable first (a bench or test may have
    put it on sys.path, not on PYTHONPATH) and one thread per worker for numeric libraries."""
    import kdcache

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(kdcache.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in
                                                  env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = "1"
    return env


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kdcache.formats.codecs.procs", str(child.fileno())],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, close_fds=True,
                env=_worker_env())
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.sock = parent
        self.pending: collections.deque[Future] = collections.deque()
        self.lock = threading.Lock()
        self.dead: str | None = None
        self.reader = threading.Thread(target=self._read, name=f"kdcache-encode-reader-{index}",
                                       daemon=True)
        self.reader.start()

    def submit(self, request: dict, fds: Sequence[int] = ()) -> Future:
        fut: Future = Future()
        data = json.dumps(request).encode()
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"encode request of {len(data)} bytes exceeds {MAX_MESSAGE}")
        with self.lock:
            if self.dead is not None:
                fut.set_exception(EncodeWorkerError(self.dead))
                return fut
            self.pending.append(fut)
            try:
                socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)
            except OSError as exc:
                self.pending.pop()
                fut.set_exception(EncodeWorkerError(
                    f"encode worker {self.index} (pid {self.proc.pid}) is gone: {exc}"))
        return fut

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                break
            with self.lock:
                fut = self.pending.popleft() if self.pending else None
            if fut is not None:
                fut.set_result(json.loads(data))
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        with self.lock:
            self.dead = (f"encode worker {self.index} (pid {self.proc.pid}) exited with code "
                         f"{code} while encoding")
            pending, self.pending = list(self.pending), collections.deque()
        for fut in pending:
            fut.set_exception(EncodeWorkerError(self.dead))

    def close(self, timeout: float = 10.0) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=timeout)


class ProcessPool:
    """`workers` encoding processes; `submit(i, request, fds)` -> Future of worker i's reply."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, int(workers))
        self._workers: list[_Worker] = []
        try:
            for i in range(self.workers):
                self._workers.append(_Worker(i))
        except BaseException:
            self.close()
            raise

    @property
    def broken(self) -> bool:
        return any(w.dead is not None for w in self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def submit(self, index: int, request: dict, fds: Sequence[int] = ()) -> Future:
        return self._workers[index % self.workers].submit(request, fds)

    def close(self) -> None:
        for w in self._workers:
            w.close()
        self._workers = []


def replies(futures: Sequence[Future]) -> list[dict]:
    """Every reply, in order, once all are in; the first failure raised (a worker's
    validation error as TargetValidationError, anything else as EncodeWorkerError)."""
    out = []
    for fut in futures:
        try:
            out.append(fut.result())
        except EncodeWorkerError as exc:
            out.append({"error": str(exc), "kind": "died"})
    for r in out:
        if "error" in r:
            if r.get("kind") == "validation":
                raise TargetValidationError(r["error"])
            raise EncodeWorkerError(r["error"])
    return out


_pools: dict[int, ProcessPool] = {}
_pools_lock = threading.Lock()


def process_pool(workers: int) -> ProcessPool:
    """The process-wide pool of `workers` encoding processes (started on first use, replaced
    if one of its workers died)."""
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is not None and pool.broken:
            pool.close()
            pool = None
        if pool is None:
            pool = _pools[workers] = ProcessPool(workers)
        return pool


def close_pools() -> None:
    """Stop every encoding process of this process (at exit, and for tests)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close()


def _forget_pools_in_child() -> None:
    """A forked child does not own its parent's workers (their sockets are the parent's)."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


atexit.register(close_pools)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)


# ---------------------------------------------------------------------------- the worker


def serve(sock: socket.socket, ops: dict[str, Callable[[dict, dict, list[int]], dict | None]]) -> None:
    """Answer requests {"op": name, ...} in order until the socket closes."""
    state: dict = {}
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
        except OSError:
            return
        if not data:
            return
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            req = json.loads(data)
            reply = {"ok": True, **(ops[req["op"]](state, req, fds) or {}),
                     "seconds": round(time.perf_counter() - t0, 6),
                     "cpu_seconds": round(time.process_time() - c0, 6)}
        except TargetValidationError as exc:
            reply = {"error": str(exc), "kind": "validation"}
        except Exception as exc:  # the cause goes back to the writer, which raises it
            tb = traceback.format_exc(limit=6)
            reply = {"error": f"encode worker (pid {os.getpid()}): {type(exc).__name__}: {exc}\n"
                              f"{tb[-3000:]}", "kind": "internal"}
        finally:
            for fd in fds:  # an op that keeps the memory has mapped it (mmap holds its own)
                try:
                    os.close(fd)
                except OSError:
                    pass
        try:
            sock.send(json.dumps(reply).encode()[:MAX_MESSAGE])
        except OSError:  # the writer is gone
            return


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # the teacher's thread (in the writer's process) keeps the GPU fed: it goes first
        os.nice(WORKER_NICE)
    except OSError:
        pass
    sock = socket.socket(fileno=int(argv[1]))
    from kdcache.formats.codecs.qrank_procs import WORKER_OPS

    serve(sock, WORKER_OPS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
