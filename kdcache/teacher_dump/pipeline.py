"""Shards written while the teacher computes the next: the overlap every dump path shares.

The engine is called on the thread that drives the pipeline, in groups of about
`ENGINE_CALL_TOKENS` tokens (all requests of a group, thousands of short documents included, go
to the engine in one call). Each group's WindowRecords go to the shard's writer, which validates,
encodes (a thread pool inside `write_shard`) and writes on background threads. `start` returns
as soon as the engine is done with a shard, so the next shard's engine calls run while the last
group of this one is still being encoded and written; at most `max_writing` shards are being
written at once, and each writer holds a bounded number of windows, so memory stays bounded when
the encoder is slower than the teacher (the teacher then waits, it never runs ahead unbounded).

`EngineThread` gives an engine a thread of its own for callers that have none to spare: a Ray
actor's methods, which run on Ray's threads. vLLM is built, called and closed on that one
thread (vLLM-CPU binds its OpenMP threads to the thread that starts it; an engine is never
called from two threads at once). In-process users (benches) drive a `ShardPipeline` from their
own thread with the engine they built there.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from kdcache.formats.window import WindowRecord
from kdcache.formats.writer import write_shard
from kdcache.teacher_dump.pack import PackedWindow

ENGINE_CALL_TOKENS = 16384  # windows are sent to the engine in groups of about this many tokens
MAX_WRITING = 2  # shards being encoded / written at once behind the engine
_QUEUED_RECORDS = 2  # finished windows waiting for a shard's writer (beyond its encode pool)
_END = object()


def engine_groups(windows: Iterable[PackedWindow],
                  call_tokens: int = ENGINE_CALL_TOKENS) -> Iterator[list[PackedWindow]]:
    """Consecutive windows in groups of at least `call_tokens` tokens (the last may be less)."""
    group: list[PackedWindow] = []
    tokens = 0
    for w in windows:
        group.append(w)
        tokens += w.n_tokens
        if tokens >= call_tokens:
            yield group
            group, tokens = [], 0
    if group:
        yield group


def group_records(engine, group: list[PackedWindow]) -> list:
    """The engine's targets for one group, as WindowRecords for the writer (a `sampled` dump,
    engine.cfg.draws > 0, stores the draws: distinct ids and counts / draws)."""
    sampled = bool(getattr(getattr(engine, "cfg", None), "draws", 0))
    records = []
    for w, t in zip(group, engine.topk(group)):
        ids, values = (t.draw_ids, t.draw_weights) if sampled else (t.ids, t.logprobs)
        records.append(WindowRecord(window_index=w.window_index, tokens=w.tokens,
                                    doc_offsets=w.doc_offsets, valid=t.valid, ids=ids,
                                    values=values, doc_ids=w.doc_ids, doc_pieces=w.doc_pieces))
    return records


class _Aborted(Exception):
    """The engine side stopped before the shard's last window (the writer discards the shard)."""


class ShardPipeline:
    """An engine and the writers of the shards it computes (see the module docstring)."""

    def __init__(self, engine, *, max_writing: int = MAX_WRITING,
                 call_tokens: int = ENGINE_CALL_TOKENS) -> None:
        self.engine = engine
        self.call_tokens = call_tokens
        self._writers = ThreadPoolExecutor(max_workers=max_writing,
                                           thread_name_prefix="kdcache-shard-writer")
        self._slots = threading.BoundedSemaphore(max_writing)

    def start(self, out: str, name: str, windows: list[PackedWindow], header, codec,
              encode_workers: int | None = None) -> Future:
        """Compute `windows` on this thread and hand them to a writer; the future holds the
        ShardInfo once the shard is written. Blocks while `max_writing` shards are in writing."""
        self._slots.acquire()
        records: queue.Queue = queue.Queue(maxsize=_QUEUED_RECORDS)
        try:
            written = self._writers.submit(write_shard, out, name, _drain_queue(records), header,
                                           codec, encode_workers=encode_workers)
        except BaseException:
            self._slots.release()
            raise
        written.add_done_callback(lambda _: self._slots.release())
        try:
            for group in engine_groups(windows, self.call_tokens):
                for rec in group_records(self.engine, group):
                    if not _put_unless_done(records, rec, written):
                        return written  # the writer failed: its future holds the error
            _put_unless_done(records, _END, written)
        except BaseException:
            _put_unless_done(records, _Aborted("the teacher stopped mid-shard"), written)
            raise
        return written

    def write(self, out: str, name: str, windows: list[PackedWindow], header, codec,
              encode_workers: int | None = None):
        """One shard, start to written (its ShardInfo)."""
        return self.start(out, name, windows, header, codec, encode_workers).result()

    def write_all(self, out: str, shards: Iterable[tuple[str, list[PackedWindow]]], header,
                  codec, encode_workers: int | None = None) -> list:
        """Several shards in order, each written while the engine computes the next (the
        in-process counterpart of the runner's scheduling); their ShardInfos."""
        futures = [self.start(out, name, windows, header, codec, encode_workers)
                   for name, windows in shards]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._writers.shutdown(wait=True)


def _put_unless_done(q: queue.Queue, item: Any, writer: Future) -> bool:
    """Put `item` for the writer unless the writer has stopped (then False)."""
    while not writer.done():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _drain_queue(q: queue.Queue) -> Iterator:
    while True:
        item = q.get()
        if item is _END:
            return
        if isinstance(item, _Aborted):
            raise item
        yield item


class EngineThread:
    """An engine built, called and closed on one dedicated thread (see the module docstring)."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-engine")
        try:
            self.engine = self.call(build)
        except BaseException:
            self._thread.shutdown(wait=False)
            raise

    def call(self, fn: Callable, *args, **kwargs):
        """`fn(*args)` on the engine's thread, after every call submitted before it."""
        return self._thread.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        try:
            self.call(self.engine.close)
        finally:
            self._thread.shutdown(wait=True)
