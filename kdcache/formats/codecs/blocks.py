"""Threads that one window's encoding is spread over, in blocks of rows or columns.

A GPU teacher hands the writer a few long windows at a time (one 32k window per engine call),
so parallelism over windows alone leaves most cores idle; a codec cuts a window into blocks and
runs them here. The work is numpy (which releases the GIL on large arrays), numba (`nogil`) and
zstd (which releases it too), so threads suffice. The pool of a given size is one per process,
shared by every shard being written: concurrent shards do not multiply the threads.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BlockPool:
    """Runs a list of independent blocks on `workers` threads (inline with one worker).

    Blocks never wait on other blocks, so callers on other pools (the writer's window threads)
    may wait on them without deadlock."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, int(workers))
        self._pool = (ThreadPoolExecutor(max_workers=self.workers,
                                         thread_name_prefix="kdcache-block")
                      if self.workers > 1 else None)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """[fn(x) for x in items], in order, the blocks on the pool's threads."""
        if self._pool is None or len(items) <= 1:
            return [fn(x) for x in items]
        futures = [self._pool.submit(fn, x) for x in items]
        try:
            return [f.result() for f in futures]
        finally:  # on an error, what has not started is dropped
            for f in futures:
                f.cancel()


INLINE = BlockPool(1)
_pools: dict[int, BlockPool] = {}
_pools_lock = threading.Lock()


def _forget_pools_in_child() -> None:
    """A forked child has none of its parent's pool threads (work queued there would wait
    forever): it starts its own pools."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)


def block_pool(workers: int) -> BlockPool:
    """The process-wide pool of `workers` threads (created on first use; 1: inline)."""
    workers = max(1, int(workers))
    if workers == 1:
        return INLINE
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = BlockPool(workers)
        return pool


def split(n: int, parts: int, *, multiple: int = 1, minimum: int = 1) -> list[tuple[int, int]]:
    """[0, n) cut into at most `parts` consecutive ranges of at least `minimum` items whose
    starts are multiples of `multiple` (one empty range when n == 0)."""
    if n <= 0:
        return [(0, 0)]
    size = max(minimum, -(-n // max(1, parts)))
    size = -(-size // multiple) * multiple
    return [(a, min(a + size, n)) for a in range(0, n, size)]
