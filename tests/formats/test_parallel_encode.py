"""write_shard encodes windows in a thread pool: the shard must not depend on the thread count,
and a bad window (or a failing producer) still leaves no shard behind."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.errors import TargetValidationError
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.synthetic import synthetic_window
from kdcache.formats.writer import default_encode_threads, prepare_codec, write_shard


def _setup(kind="topk", k=8, vocab=5000):
    header = DatasetHeader(kind=kind, k=k, vocab_size=vocab, codec="qrank",
                           packing={"window": 512, "mode": "document"})
    rng = np.random.default_rng(3)
    windows = [synthetic_window(rng, i, 512, vocab, k, kind=kind) for i in range(9)]
    return header, prepare_codec(header, sample_ids=windows[0].ids), windows


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_shard_bytes_do_not_depend_on_encode_threads(tmp_path, kind):
    header, codec, windows = _setup(kind)
    infos = [write_shard(str(tmp_path / f"t{t}"), "shard-00000", iter(windows), header, codec,
                         encode_threads=t) for t in (1, 3, 8)]
    assert len({i.xxh3 for i in infos}) == 1 and len({i.bytes for i in infos}) == 1
    assert infos[0].windows == 9 and (infos[0].first_window, infos[0].last_window) == (0, 8)


def test_bad_window_in_a_threaded_shard_leaves_nothing(tmp_path):
    header, codec, windows = _setup()
    bad = windows[5]
    bad.values[3, 0] = np.nan
    with pytest.raises(TargetValidationError, match="NaN"):
        write_shard(str(tmp_path), "shard-00000", iter(windows), header, codec, encode_threads=4)
    assert not list(tmp_path.rglob("*.arrow"))


def test_failing_producer_leaves_nothing(tmp_path):
    header, codec, windows = _setup()

    def produce():
        yield from windows[:4]
        raise RuntimeError("teacher died")

    with pytest.raises(RuntimeError, match="teacher died"):
        write_shard(str(tmp_path), "shard-00000", produce(), header, codec, encode_threads=3)
    assert not list(tmp_path.rglob("*.arrow"))


def test_encode_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv("KDCACHE_ENCODE_THREADS", "3")
    assert default_encode_threads() == 3
    monkeypatch.setenv("KDCACHE_ENCODE_THREADS", "many")
    with pytest.raises(ValueError, match="KDCACHE_ENCODE_THREADS"):
        default_encode_threads()
    monkeypatch.delenv("KDCACHE_ENCODE_THREADS")
    assert 1 <= default_encode_threads() <= 16
