"""ShardPipeline and EngineThread (no Ray): shards written behind a real HF engine.

Pipelined shards must be byte-identical to shards written one after the other; a writer error
reaches the caller with its own message, and an engine that fails mid-shard leaves no shard and
no temporary file behind.
"""

from __future__ import annotations

import os
import threading

import pytest

from kdcache.errors import TargetValidationError
from kdcache.teacher_dump.corpus import CorpusSpec, CorpusStats, iter_documents
from kdcache.teacher_dump.engines.base import EngineConfig, TeacherEngine
from kdcache.teacher_dump.engines.hf import HFEngine
from kdcache.teacher_dump.pack import PackConfig, PackStats, TeacherTokenizer, pack_documents
from kdcache.teacher_dump.pipeline import EngineThread, ShardPipeline, engine_groups

K = 8
WINDOW = 256


@pytest.fixture(scope="module")
def windows(teacher_dir):
    tok = TeacherTokenizer(teacher_dir)
    docs = iter_documents(CorpusSpec("builtin", builtin_documents=24), CorpusStats())
    return list(pack_documents(docs, tok, PackConfig(window=WINDOW), PackStats()))[:6]


@pytest.fixture(scope="module")
def engine(teacher_dir):
    return HFEngine(EngineConfig(model=teacher_dir, k=K, window=WINDOW, mode="document",
                                 device="cpu"))


def _header(vocab_size: int = 1024):
    from kdcache.formats.manifest import DatasetHeader
    from kdcache.formats.writer import prepare_codec

    header = DatasetHeader(kind="topk", k=K, vocab_size=vocab_size, codec="qrank",
                           packing={"window": WINDOW, "mode": "document"})
    return header, prepare_codec(header)


def _files(root) -> dict[str, bytes]:
    return {name: (root / "shards" / name).read_bytes()
            for name in sorted(os.listdir(root / "shards"))}


class _Recording(TeacherEngine):
    """The HF engine, noting the thread of each call and failing on call `fail_at` (if set);
    TeacherEngine's default split (all of `topk` on the engine's thread)."""

    def __init__(self, engine, fail_at: int | None = None) -> None:
        self.engine, self.cfg = engine, engine.cfg
        self.fail_at, self.threads, self.calls = fail_at, [], 0

    def topk(self, group):
        self.calls += 1
        self.threads.append(threading.get_ident())
        if self.calls == self.fail_at:
            raise RuntimeError("teacher fell over")
        return self.engine.topk(group)

    def close(self) -> None:
        pass


class _Split(TeacherEngine):
    """The HF engine behind the compute / finish split of TeacherEngine (the vLLM engine's
    shape): compute on the engine's thread, finish wherever the pipeline runs it; each call's
    thread noted, finish failing on call `fail_at` (if set)."""

    def __init__(self, engine, fail_at: int | None = None) -> None:
        self.engine, self.cfg, self.fail_at = engine, engine.cfg, fail_at
        self.compute_threads, self.finish_threads = [], []

    def compute(self, group):
        self.compute_threads.append(threading.get_ident())
        return self.engine.topk(group)

    def finish(self, group, computed):
        self.finish_threads.append(threading.get_ident())
        if len(self.finish_threads) == self.fail_at:
            raise RuntimeError("conversion fell over")
        return computed

    def topk(self, group):
        return self.finish(group, self.compute(group))


class _Queued(_Split):
    """A `_Split` that queues work ahead as vLLM's pooler path does (`feeds`): `submit` only
    notes the group, `collect` computes it (failing on collect `fail_at`, if set); the order of
    the calls is recorded, and what `abandon` found still queued."""

    feeds = True

    def __init__(self, engine, fail_at: int | None = None) -> None:
        super().__init__(engine)
        self.fail_collect, self.events, self.queued, self.abandoned = fail_at, [], {}, []

    def submit(self, group):
        ticket = sum(e[0] == "submit" for e in self.events)
        self.events.append(("submit", ticket))
        self.queued[ticket] = group
        return ticket

    def collect(self, ticket):
        self.events.append(("collect", ticket))
        if sum(e[0] == "collect" for e in self.events) == self.fail_collect:
            raise RuntimeError("collect fell over")
        return self.compute(self.queued.pop(ticket))

    def abandon(self) -> None:
        self.abandoned.append(sorted(self.queued))
        self.queued.clear()


def test_engine_groups_cover_windows_in_order(windows):
    groups = list(engine_groups(windows, call_tokens=300))
    assert [w for g in groups for w in g] == windows
    assert all(sum(w.n_tokens for w in g) >= 300 for g in groups[:-1])
    assert list(engine_groups(windows, call_tokens=1)) == [[w] for w in windows]


def test_engine_call_tokens_grow_as_k_shrinks():
    from kdcache.teacher_dump.pipeline import ENGINE_CALL_TOKENS, engine_call_tokens

    assert engine_call_tokens(64) == engine_call_tokens(256) == ENGINE_CALL_TOKENS
    assert engine_call_tokens(16) == 4 * ENGINE_CALL_TOKENS
    assert engine_call_tokens(0) == 64 * ENGINE_CALL_TOKENS  # sampled-only rows: bounded


def test_pipeline_groups_by_the_shards_k(engine, windows, tmp_path, monkeypatch):
    """With no call_tokens a shard's groups hold about ENGINE_CALL_ENTRIES token-ranks at its
    k: here 600 x 8 entries at k = 8, groups of 600 tokens (3 of the 256-token windows)."""
    import kdcache.teacher_dump.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "ENGINE_CALL_TOKENS", 1)
    monkeypatch.setattr(pipeline_module, "ENGINE_CALL_ENTRIES", 600 * K)
    expected = list(engine_groups(windows, call_tokens=600))
    assert 1 < len(expected) < len(windows)
    header, codec = _header()
    split = _Split(engine)
    pipeline = ShardPipeline(split)
    try:
        info = pipeline.write(str(tmp_path), "shard-00000", windows, header, codec)
    finally:
        pipeline.close()
    assert len(split.compute_threads) == len(expected) and info.windows == len(windows)


@pytest.mark.parametrize("queued", [False, True], ids=["compute", "fed"])
def test_writer_error_reaches_the_caller(engine, windows, tmp_path, queued):
    """... and a queueing engine is left with nothing queued (none runs on into the next
    shard)."""
    header, codec = _header(vocab_size=16)  # the teacher's ids exceed this vocabulary
    piped = _Queued(engine) if queued else engine
    pipeline = ShardPipeline(piped, call_tokens=1, feed=True)
    try:
        with pytest.raises(TargetValidationError):
            pipeline.write(str(tmp_path), "shard-00000", windows, header, codec)
    finally:
        pipeline.close()
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs]  # no shard, no temporary
    if queued:
        assert piped.queued == {} and len(piped.abandoned) == 1


@pytest.mark.parametrize("queued", [False, True], ids=["compute", "fed"])
def test_engine_failure_mid_shard_leaves_nothing(engine, windows, tmp_path, queued):
    """... and what a queueing engine still held is abandoned."""
    header, codec = _header()
    failing = _Queued(engine, fail_at=2) if queued else _Recording(engine, fail_at=2)
    pipeline = ShardPipeline(failing, call_tokens=1, feed=True)
    try:
        with pytest.raises(RuntimeError, match="fell over"):
            pipeline.start(str(tmp_path), "shard-00000", windows, header, codec)
        if queued:  # groups 0 and 1 collected (1 failing), 2 submitted behind it
            assert failing.abandoned == [[1, 2]] and failing.queued == {}
        # the pipeline still works for the next shard (its writer slot was given back)
        info = pipeline.write(str(tmp_path), "shard-00001", windows[:1],
                              header, codec)
    finally:
        pipeline.close()
    assert info.windows == 1
    assert sorted(os.listdir(tmp_path / "shards")) == ["shard-00001.arrow"]


def test_engine_thread_builds_and_calls_on_one_thread(engine, windows):
    built_on = []

    def build():
        built_on.append(threading.get_ident())
        return _Recording(engine)

    thread = EngineThread(build)
    try:
        for w in windows[:2]:
            thread.call(thread.engine.topk, [w])
    finally:
        thread.close()
    assert built_on[0] != threading.get_ident()
    assert thread.engine.threads == [built_on[0]] * 2


@pytest.mark.parametrize("split", ["topk", "compute-finish", "fed"])
def test_pipelined_shards_equal_serial_shards(engine, windows, tmp_path, split):
    """Pipelined shards (several engine calls per shard; with an engine split like vLLM's, its
    results finished on the converting thread; with one that queues ahead, each group
    submitted before the last is collected) have the bytes of shards written serially."""
    from kdcache.formats.writer import write_shard
    from kdcache.teacher_dump.pipeline import group_records

    header, codec = _header()
    serial, piped = tmp_path / "serial", tmp_path / "piped"
    shards = [("shard-00000", windows[:3]), ("shard-00001", windows[3:])]
    for name, wins in shards:
        write_shard(str(serial), name, group_records(engine, wins), header, codec)
    piped_engine = {"topk": engine, "compute-finish": _Split(engine),
                    "fed": _Queued(engine)}[split]
    pipeline = ShardPipeline(piped_engine, call_tokens=200, feed=True)
    try:
        infos = pipeline.write_all(str(piped), shards, header, codec)
    finally:
        pipeline.close()
    assert [i.windows for i in infos] == [3, len(windows) - 3]
    assert _files(piped) == _files(serial)
    if split == "fed":  # group i+1 queued before group i is collected; drained per shard
        expected, ticket = [], 0
        for _, wins in shards:
            n = len(list(engine_groups(wins, 200)))
            calls = [("submit", ticket)]
            for i in range(ticket + 1, ticket + n):
                calls += [("submit", i), ("collect", i - 1)]
            expected += calls + [("collect", ticket + n - 1)]
            ticket += n
        assert ticket > 3 and piped_engine.events == expected
        assert piped_engine.queued == {} and piped_engine.abandoned == [[], []]
    if split != "topk":
        assert set(piped_engine.compute_threads) == {threading.get_ident()}
        assert len(piped_engine.finish_threads) == len(piped_engine.compute_threads) > 2
        assert threading.get_ident() not in piped_engine.finish_threads


def test_conversion_failure_leaves_nothing(engine, windows, tmp_path):
    header, codec = _header()
    pipeline = ShardPipeline(_Split(engine, fail_at=2), call_tokens=1, feed=True)
    try:
        future = pipeline.start(str(tmp_path), "shard-00000", windows, header, codec)
        with pytest.raises(RuntimeError, match="conversion fell over"):
            future.result()
    finally:
        pipeline.close()
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs]  # no shard, no temporary


def test_pipeline_without_feed_calls_compute(engine, windows, tmp_path):
    """`ShardPipeline` by default (feed=False): one blocking call per group even for a queueing
    engine."""
    header, codec = _header()
    queued = _Queued(engine)
    pipeline = ShardPipeline(queued, call_tokens=200)
    try:
        pipeline.write(str(tmp_path), "shard-00000", windows, header, codec)
    finally:
        pipeline.close()
    assert queued.events == [] and len(queued.compute_threads) > 2


def test_ahead_keeps_order_raises_and_stops_early():
    from kdcache.teacher_dump.pipeline import ahead

    assert list(ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("corpus went away")

    got = []
    with pytest.raises(ValueError, match="corpus went away"):
        for x in ahead(failing()):
            got.append(x)
    assert got == [1]
    produced = []

    def endless():
        for i in range(10**9):
            produced.append(i)
            yield i

    stream = ahead(endless())
    assert next(stream) == 0
    stream.close()  # the producer stops, one item or so ahead
    assert len(produced) <= 4
