"""Engines: vLLM (both paths) against the transformers reference on the same windows.

Tolerance (measured on the tiny fp32 teacher, 2 CPU cores): the top-k id sets agree on every row
whose k-th and (k+1)-th log-probs are further apart than TIE_GAP (order may differ only between
near-tied entries: seen on 2 of ~7,000 entries); log-probs by rank differ by at most LOGPROB_TOL
(observed max 1.7e-6; vLLM and HF sum attention in different orders).
"""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.teacher_dump.corpus import CorpusSpec, CorpusStats, iter_documents
from kdcache.teacher_dump.engines.base import EngineConfig
from kdcache.teacher_dump.engines.hf import HFEngine
from kdcache.teacher_dump.pack import PackConfig, PackStats, TeacherTokenizer, pack_documents

LOGPROB_TOL = 1e-4
TIE_GAP = 1e-4
K = 16


@pytest.fixture(scope="module")
def windows(teacher_dir):
    tok = TeacherTokenizer(teacher_dir)
    docs = iter_documents(CorpusSpec("builtin", builtin_documents=16, builtin_seed=5), CorpusStats())
    wins = list(pack_documents(docs, tok, PackConfig(window=512, seed=1), PackStats()))
    return wins[:3]


@pytest.fixture(scope="module")
def hf_engine(teacher_dir):
    return HFEngine(EngineConfig(model=teacher_dir, k=K + 1, window=512, mode="document",
                                 device="cpu"))


def _hf(engine, wins, mode):
    engine.reconfigure(k=K + 1, mode=mode, window=512)
    return engine.topk(wins)


def _to_dicts(wins):
    from kdcache.teacher_dump.workers import window_to_dict

    return [window_to_dict(w) for w in wins]


def _vllm(worker, wins, mode, k=K):
    import ray

    from kdcache.formats.manifest import DatasetHeader

    header = DatasetHeader(kind="topk", k=k, vocab_size=1024, codec="raw",
                           packing={"mode": mode, "window": 512})
    ray.get(worker.configure.remote("/nonexistent", vars(header), None))
    return ray.get(worker.topk.remote(_to_dicts(wins)))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["pooler", "prompt-logprobs"])
@pytest.mark.parametrize("mode", ["causal", "document"])
def test_vllm_agrees_with_hf(vllm_workers, hf_engine, windows, path, mode):
    ref = _hf(hf_engine, windows, mode)  # k+1 columns: the gap to the (k+1)-th tells ties
    got = _vllm(vllm_workers[path], windows, mode)
    worst = 0.0
    for r, (ids, lps, valid) in zip(ref, got):
        assert np.array_equal(valid, r.valid)
        assert ids.shape == (r.ids.shape[0], K) and ids.dtype == np.int32
        assert np.all(ids[~valid] == -1) and np.all(np.isneginf(lps[~valid]))
        v = valid
        assert np.all(np.diff(lps[v], axis=1) <= 0)  # descending, exactly k per row
        clear = (r.logprobs[v][:, K - 1] - r.logprobs[v][:, K]) > TIE_GAP
        assert clear.mean() > 0.9
        # the same top-k set (ties inside the top-k may swap order: compare sets)
        np.testing.assert_array_equal(np.sort(ids[v][clear], axis=1),
                                      np.sort(r.ids[v][clear, :K], axis=1))
        order_same = (ids[v][clear] == r.ids[v][clear, :K]).all(axis=1).mean()
        assert order_same > 0.99
        # sorted log-probs by rank (equal up to rounding even where tied ids swapped)
        diff = np.abs(lps[v][clear] - r.logprobs[v][clear, :K])
        worst = max(worst, float(diff.max()))
        assert np.all(np.exp(lps[v]).sum(1) <= 1 + 1e-4)  # full-vocabulary normalisation
    assert worst <= LOGPROB_TOL, worst
    print(f"vLLM {path} vs HF ({mode}): max |dlogprob| {worst:.2e}")


@pytest.mark.slow
def test_vllm_run_to_run_noise(vllm_workers, windows):
    """The same windows twice through the same engine: the dump's resume tolerance."""
    a = _vllm(vllm_workers["pooler"], windows, "document")
    b = _vllm(vllm_workers["pooler"], windows, "document")
    for (ia, la, va), (ib, lb, _) in zip(a, b):
        assert np.array_equal(ia, ib)
        assert np.abs(la[va] - lb[va]).max() <= 1e-6  # measured: 0 (bitwise equal)


def test_hf_document_global_uses_window_positions(hf_engine, windows):
    """document-global = each document run with positions from its offset in the window."""
    import torch

    win = windows[0]
    got = _hf(hf_engine, [win], "document-global")[0]
    doc = _hf(hf_engine, [win], "document")[0]
    s, e = int(win.doc_offsets[1]), int(win.doc_offsets[2])  # the second document
    ids = torch.as_tensor(win.tokens[s:e], dtype=torch.long)[None]
    with torch.inference_mode():
        logits = hf_engine.model(input_ids=ids, position_ids=torch.arange(s, e)[None]).logits[0]
    ref = torch.log_softmax(logits.float(), -1).topk(K + 1).values.numpy()
    np.testing.assert_allclose(got.logprobs[s:e - 1], ref[:-1], atol=1e-4)
    # pure RoPE: document-global equals document up to rounding (MISSION.md)
    v = got.valid
    assert np.abs(got.logprobs[v] - doc.logprobs[v]).max() < 1e-2


def test_engine_refuses_unknown_mode(teacher_dir):
    from kdcache.teacher_dump.engines import EngineError, make_engine

    with pytest.raises(EngineError, match="cannot serve packing mode"):
        make_engine("hf", EngineConfig(model=teacher_dir, mode="sideways"))


@pytest.mark.slow
def test_vllm_many_document_window_matches_hf(vllm_workers, hf_engine, teacher_dir):
    """A document-mode window of ~60 short documents (one vLLM request each, all sent in one
    engine call) gives the same targets as the HF engine running each document alone."""
    from kdcache.teacher_dump.pack import pack_token_docs

    tok = TeacherTokenizer(teacher_dir)
    rng = np.random.default_rng(3)
    docs = [(i, rng.integers(3, 1000, size=int(rng.integers(2, 10))).tolist())
            for i in range(80)]
    win = next(iter(pack_token_docs(docs, PackConfig(window=512), tok.bos_id, tok.eos_id,
                                    PackStats())))
    assert len(win.doc_offsets) - 1 >= 40
    ref = _hf(hf_engine, [win], "document")[0]
    default_path = EngineConfig(model=teacher_dir).vllm_path
    ids, lps, valid = _vllm(vllm_workers[default_path], [win], "document")[0]
    assert np.array_equal(valid, ref.valid)
    clear = (ref.logprobs[valid][:, K - 1] - ref.logprobs[valid][:, K]) > TIE_GAP
    np.testing.assert_array_equal(np.sort(ids[valid][clear], axis=1),
                                  np.sort(ref.ids[valid][clear, :K], axis=1))
    assert np.abs(lps[valid][clear] - ref.logprobs[valid][clear, :K]).max() <= LOGPROB_TOL


def test_hf_batched_documents_equal_documents_run_alone(hf_engine, windows):
    """Right-padded batches of documents give each document's own forward (causal mask: real
    tokens never see the padding), in document and document-global modes."""
    import torch

    from kdcache.teacher_dump.engines.base import segments_for_mode
    from kdcache.teacher_dump.engines.hf import length_batches

    assert length_batches([5, 9, 2, 9], budget=18) == [[1, 3], [0, 2]]
    assert length_batches([30, 4], budget=16) == [[0], [1]]  # too long for any batch: alone
    win = windows[0]
    for mode in ("document", "document-global"):
        got = _hf(hf_engine, [win], mode)[0]
        assert len(segments_for_mode(win, mode)) > 1
        for s, e, p in segments_for_mode(win, mode):
            h = hf_engine.hidden_states(win.tokens[s:e], p)
            with torch.inference_mode():
                lp = torch.log_softmax(hf_engine.head(h), -1)
            ref = lp.topk(K + 1).values.numpy()
            v = got.valid[s:e]
            np.testing.assert_allclose(got.logprobs[s:e][v], ref[v], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["pooler", "prompt-logprobs"])
def test_vllm_pipeline_shard_equals_shard_of_topk(vllm_workers, windows, tmp_path, path):
    """A shard the engine's actor writes through its pipeline (vLLM's results converted on the
    pipeline's converting thread, not the engine's) has the bytes of a shard written here from
    the same engine's `topk` (vLLM-CPU is bitwise repeatable: test_vllm_run_to_run_noise)."""
    import ray

    from kdcache.formats.manifest import DatasetHeader
    from kdcache.formats.window import WindowRecord
    from kdcache.formats.writer import prepare_codec, write_shard

    header = DatasetHeader(kind="topk", k=K, vocab_size=1024, codec="qrank",
                           packing={"mode": "document", "window": 512})
    codec = prepare_codec(header)
    worker = vllm_workers[path]
    ray.get(worker.configure.remote(str(tmp_path / "piped"), vars(header), codec.table, 1))
    ray.get(worker.run_shard.remote("shard-00000", _to_dicts(windows)))
    targets = ray.get(worker.topk.remote(_to_dicts(windows)))
    records = [WindowRecord(window_index=w.window_index, tokens=w.tokens,
                            doc_offsets=w.doc_offsets, valid=valid, ids=ids, values=lps,
                            doc_ids=w.doc_ids, doc_pieces=w.doc_pieces)
               for w, (ids, lps, valid) in zip(windows, targets)]
    write_shard(str(tmp_path / "serial"), "shard-00000", records, header, codec,
                encode_workers=1)
    shard = "shards/shard-00000.arrow"
    assert (tmp_path / "piped" / shard).read_bytes() == (tmp_path / "serial" / shard).read_bytes()


@pytest.fixture(scope="module")
def short_windows(teacher_dir):
    """Eight windows of at most 448 tokens: vLLM-CPU's attention reduces keys past ~480
    positions in an order that depends on the batch (measured: 2.4e-6 on 2 of 8 causal 512-token
    windows, ids equal), below that each request's result is the same bits in any batch."""
    tok = TeacherTokenizer(teacher_dir)
    docs = iter_documents(CorpusSpec("builtin", builtin_documents=48, builtin_seed=7),
                          CorpusStats())
    wins = list(pack_documents(docs, tok, PackConfig(window=448, seed=2), PackStats()))[:8]
    assert len(wins) == 8 and max(w.n_tokens for w in wins) <= 448
    return wins


@pytest.mark.parametrize("mode", ["causal", "document"])
def test_vllm_fed_groups_are_the_blocking_groups(vllm_workers, short_windows, mode):
    """The pooler path fed ahead (each group's requests queued in vLLM before the previous
    group is collected, so requests of two groups share vLLM's steps) returns every request's
    own targets in order: the bits of one blocking vLLM call per group. Fed twice: the same
    bits (a resumed shard is recomputed exactly). The feed leaves nothing queued: a blocking
    call afterwards runs."""
    import ray

    from kdcache.formats.manifest import DatasetHeader

    worker = vllm_workers["pooler"]
    header = DatasetHeader(kind="topk", k=K, vocab_size=1024, codec="raw",
                           packing={"mode": mode, "window": 512})
    ray.get(worker.configure.remote("/nonexistent", vars(header), None))
    wins = _to_dicts(short_windows)
    from kdcache.teacher_dump.pipeline import engine_groups

    call = 700  # groups of 2-3 windows, each fed behind the last
    assert len(list(engine_groups(short_windows, call))) >= 3
    blocking = ray.get(worker.topk.remote(wins, call_tokens=call, feed=False))
    fed = ray.get(worker.topk.remote(wins, call_tokens=call, feed=True))
    again = ray.get(worker.topk.remote(wins, call_tokens=call, feed=True))
    single = ray.get(worker.topk.remote(wins[:2]))  # one blocking call after the feed
    assert len(fed) == len(blocking) == len(short_windows)
    for (ib, lb, vb), (i_f, lf, vf), (ia, la, _) in zip(blocking, fed, again):
        np.testing.assert_array_equal(vb, vf)
        np.testing.assert_array_equal(ib, i_f)
        np.testing.assert_array_equal(lb, lf)
        np.testing.assert_array_equal(i_f, ia)
        np.testing.assert_array_equal(lf, la)
    for (ib, lb, _), (i1, l1, _) in zip(blocking, single):
        np.testing.assert_array_equal(ib, i1)
        np.testing.assert_array_equal(lb, l1)
    stats = ray.get(worker.feed_stats.remote())  # the default caps (twice a scheduler step)
    assert stats["room_steps"] == 0 and 0 < stats["peak_requests"] <= stats["max_requests"]
    assert stats["max_tokens"] >= 2 * (512 + 1)  # two requests of the longest length at least


@pytest.fixture(scope="module")
def many_doc_windows(teacher_dir):
    """Windows of ~40 documents of 2-20 tokens each (one vLLM request each in document mode),
    at most 448 tokens (each request's targets the same bits in any batch: short_windows)."""
    from kdcache.teacher_dump.pack import pack_token_docs

    tok = TeacherTokenizer(teacher_dir)
    rng = np.random.default_rng(11)
    docs = [(i, rng.integers(3, 1000, size=int(rng.integers(2, 20))).tolist())
            for i in range(240)]
    wins = list(pack_token_docs(docs, PackConfig(window=448), tok.bos_id, tok.eos_id,
                                PackStats()))[:-1]  # the last: the corpus's short tail
    assert len(wins) >= 4 and min(len(w.doc_offsets) - 1 for w in wins) >= 20
    return wins


@pytest.mark.parametrize("max_requests, max_tokens", [(3, None), (None, 1)],
                         ids=["3-requests", "1-token"])
def test_vllm_fed_under_caps_is_the_blocking_path(vllm_workers, many_doc_windows, max_requests,
                                                   max_tokens):
    """A document-mode feed of many short documents under caps far below one group: `submit`
    steps the engine until the next request fits (outputs delivered to their tickets), every
    group still goes through, the requests and prompt tokens in vLLM never pass the caps (but a
    request alone longer than the token cap: added once the feed has none in the engine, one
    at a time), and the targets are the blocking path's bits, in order."""
    import ray

    from kdcache.formats.manifest import DatasetHeader
    from kdcache.teacher_dump.engines.vllm import request_layout
    from kdcache.teacher_dump.pipeline import engine_groups

    worker = vllm_workers["pooler"]
    header = DatasetHeader(kind="topk", k=K, vocab_size=1024, codec="raw",
                           packing={"mode": "document", "window": 512})
    ray.get(worker.configure.remote("/nonexistent", vars(header), None))
    call = 700  # groups of 1-2 windows, 30-75 requests each, fed behind the last
    groups = list(engine_groups(many_doc_windows, call))
    assert len(groups) >= 2 and min(len(request_layout(g, "document")) for g in groups) > 20
    lengths = [end - start for _, start, end, _ in request_layout(many_doc_windows, "document")]
    wins = _to_dicts(many_doc_windows)
    blocking = ray.get(worker.topk.remote(wins, call_tokens=call, feed=False))
    ray.get(worker.limit_feed.remote(max_requests, max_tokens))
    try:
        fed = ray.get(worker.topk.remote(wins, call_tokens=call, feed=True))
        stats = ray.get(worker.feed_stats.remote())
    finally:
        ray.get(worker.limit_feed.remote())  # the default caps again, for the other tests
    assert len(fed) == len(blocking) == len(many_doc_windows)
    for (ib, lb, vb), (i_f, lf, vf) in zip(blocking, fed):
        np.testing.assert_array_equal(vb, vf)
        np.testing.assert_array_equal(ib, i_f)
        np.testing.assert_array_equal(lb, lf)
    assert stats["room_steps"] > len(groups)  # submit stepped for room, many times
    if max_requests is not None:
        assert stats["max_requests"] == max_requests == stats["peak_requests"]
        assert stats["peak_tokens"] <= stats["max_tokens"]
    else:  # every request longer than the cap: each alone in the engine
        assert stats["max_tokens"] == 1 and stats["peak_requests"] == 1
        assert stats["peak_tokens"] == max(lengths) > 1


def test_vllm_refuses_bad_feed_caps(vllm_workers):
    """A cap that is not a whole number >= 1 is an EngineError on a started engine, and the
    engine keeps its caps (a fed run afterwards is not affected)."""
    import ray

    from kdcache.teacher_dump.engines.base import EngineError

    worker = vllm_workers["pooler"]
    before = ray.get(worker.feed_stats.remote())
    with pytest.raises(EngineError, match="feed_max_requests must be a whole number"):
        ray.get(worker.limit_feed.remote(0, None))
    after = ray.get(worker.feed_stats.remote())
    assert {k: after.get(k) for k in ("max_requests", "max_tokens")} == \
        {k: before.get(k) for k in ("max_requests", "max_tokens")}


@pytest.mark.parametrize("caps", [dict(feed_max_requests=0), dict(feed_max_tokens=-5),
                                  dict(feed_max_tokens=2.5), dict(feed_max_requests=True),
                                  dict(feed_max_requests="64")])
def test_bad_feed_caps_are_refused_before_anything_runs(teacher_dir, caps):
    """The caps are checked where the engine's options are built (EngineConfig) and where the
    bench's are (BenchConfig), before an engine starts or a shard is written."""
    from kdcache.errors import KdcacheError
    from kdcache.teacher_dump.bench import BenchConfig

    with pytest.raises(KdcacheError, match="must be a whole number of at least 1"):
        EngineConfig(model=teacher_dir, **caps)
    with pytest.raises(KdcacheError, match="must be a whole number of at least 1"):
        BenchConfig(model=teacher_dir, feed=True, **caps)
    EngineConfig(model=teacher_dir, feed_max_requests=1, feed_max_tokens=1)  # the least caps
