"""write_shard validates and encodes on worker processes or threads: the shard must not depend on
how many (or which), a bad window or a failing worker surfaces as a kdcache error and leaves no
shard behind, and no encoding process outlives its writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from kdcache.errors import KdcacheError, TargetValidationError
from kdcache.formats.codecs import procs, qrank_procs
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.synthetic import synthetic_window
from kdcache.formats.writer import default_encode_workers, prepare_codec, write_shard


def _setup(kind="topk", k=8, vocab=5000, window=512, n=9, mode="document"):
    header = DatasetHeader(kind=kind, k=k, vocab_size=vocab, codec="qrank",
                           packing={"window": window, "mode": mode})
    rng = np.random.default_rng(3)
    windows = [synthetic_window(rng, i, window, vocab, k, kind=kind, mode=mode)
               for i in range(n)]
    return header, prepare_codec(header, sample_ids=windows[0].ids), windows


def _large(mode="document", n=3):
    """Windows of several row blocks each (the ones that go to worker processes)."""
    header, codec, windows = _setup(k=128, vocab=202_048, window=4100, n=n, mode=mode)
    assert all(qrank_procs.encodes_in_processes(codec, header, w) for w in windows)
    return header, codec, windows


@pytest.fixture(autouse=True)
def _no_workers_left():
    yield
    procs.close_pools()


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_shard_bytes_do_not_depend_on_encode_workers(tmp_path, kind):
    header, codec, windows = _setup(kind)
    infos = [write_shard(str(tmp_path / f"t{t}{p}"), "shard-00000", iter(windows), header,
                         codec, encode_workers=t, processes=p)
             for t, p in ((1, True), (3, False), (8, False), (3, True))]
    assert len({i.xxh3 for i in infos}) == 1 and len({i.bytes for i in infos}) == 1
    assert infos[0].windows == 9 and (infos[0].first_window, infos[0].last_window) == (0, 8)


@pytest.mark.parametrize("mode", ["document", "causal"])
def test_worker_processes_write_the_bytes_one_thread_writes(tmp_path, mode):
    header, codec, windows = _large(mode)
    infos = {(t, p): write_shard(str(tmp_path / f"t{t}{p}"), "shard-00000", iter(windows),
                                 header, codec, encode_workers=t, processes=p)
             for t, p in ((1, False), (2, False), (2, True), (3, True))}
    assert len({i.xxh3 for i in infos.values()}) == 1
    pool = procs.process_pool(3)
    assert pool.workers == 3 and all(_alive(pid) for pid in pool.pids)


@pytest.mark.parametrize("processes", [False, True])
def test_bad_window_leaves_nothing(tmp_path, processes):
    header, codec, windows = _large() if processes else _setup()
    bad = windows[1]
    row = int(np.flatnonzero(bad.valid)[-5])
    bad.values[row, 0] = np.nan
    with pytest.raises(TargetValidationError, match=f"window 1: row {row}: .*NaN"):
        write_shard(str(tmp_path), "shard-00000", iter(windows), header, codec,
                    encode_workers=3, processes=processes)
    assert not list(tmp_path.rglob("*.arrow"))


def test_failing_producer_leaves_nothing(tmp_path):
    header, codec, windows = _setup()

    def produce():
        yield from windows[:4]
        raise RuntimeError("teacher died")

    with pytest.raises(RuntimeError, match="teacher died"):
        write_shard(str(tmp_path), "shard-00000", produce(), header, codec, encode_workers=3)
    assert not list(tmp_path.rglob("*.arrow"))


def test_a_worker_error_surfaces_with_its_cause():
    pool = procs.process_pool(2)
    with pytest.raises(procs.EncodeWorkerError, match="KeyError: 'blocks'"):
        procs.replies([pool.submit(1, {"op": "kl", "key": "no-such-window", "units": 200})])
    assert issubclass(procs.EncodeWorkerError, KdcacheError)
    procs.replies([pool.submit(1, {"op": "drop", "key": "no-such-window"})])  # still serving


def test_a_dead_worker_fails_the_shard_and_is_replaced(tmp_path, monkeypatch):
    from kdcache.formats import writer

    header, codec, windows = _large(n=2)
    pool = procs.process_pool(2)
    victim = pool.pids[1]
    os.kill(victim, signal.SIGKILL)
    _wait_until(lambda: pool.broken)
    with monkeypatch.context() as m:  # the writer handed the pool whose worker died
        m.setattr(writer, "process_pool", lambda n: pool)
        with pytest.raises(procs.EncodeWorkerError, match=f"pid {victim}.* exited with code -9"):
            write_shard(str(tmp_path / "a"), "shard-00000", iter(windows), header, codec,
                        encode_workers=2)
    assert not list((tmp_path / "a").rglob("*.arrow"))
    info = write_shard(str(tmp_path / "b"), "shard-00000", iter(windows), header, codec,
                       encode_workers=2)  # a new pool replaces the broken one
    assert info.windows == 2 and victim not in procs.process_pool(2).pids
    assert not _alive(victim) and all(not _alive(p) for p in pool.pids)


def test_no_worker_outlives_its_writer(tmp_path):
    """Closed pools stop their workers; a writer killed outright takes its workers with it."""
    pool = procs.process_pool(2)
    pids = pool.pids
    procs.close_pools()
    assert not any(_alive(p) for p in pids)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.getcwd()!r})
        from tests.formats.test_parallel_encode import _large
        from kdcache.formats.codecs import procs
        from kdcache.formats.writer import write_shard
        header, codec, windows = _large(n=1)
        write_shard({str(tmp_path)!r}, "shard-00000", iter(windows), header, codec,
                    encode_workers=2)
        print(" ".join(map(str, procs.process_pool(2).pids)), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    pids = [int(p) for p in out.stdout.split()]
    assert out.returncode == -signal.SIGKILL and len(pids) == 2, out.stderr[-2000:]
    _wait_until(lambda: not any(_alive(p) for p in pids))


def test_encode_workers_from_the_environment(monkeypatch):
    monkeypatch.setenv("KDCACHE_ENCODE_WORKERS", "3")
    assert default_encode_workers() == 3
    monkeypatch.setenv("KDCACHE_ENCODE_WORKERS", "many")
    with pytest.raises(ValueError, match="KDCACHE_ENCODE_WORKERS"):
        default_encode_workers()
    monkeypatch.delenv("KDCACHE_ENCODE_WORKERS")
    assert 1 <= default_encode_workers() <= 16


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_until(cond, seconds: float = 60.0) -> None:
    """Wait for something another process does (not a timing assertion: a generous bound)."""
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.05)
