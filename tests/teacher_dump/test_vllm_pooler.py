"""The vLLM `pooler` path (top-k inside vLLM's worker from the model's own compute_logits) gives
the model's real next-token distribution for architectures whose logits are not plain `W h`,
and sampled draws that are unbiased and reproducible.

Each teacher runs in its own Ray actor holding a real vLLM-CPU engine, one after the other (each
closed before the next starts). The reference is transformers' own forward (fp32, CPU). For the
soft-capped and biased teachers the test also shows that dropping the feature changes the
targets by far more than the tolerance, so an engine that ignored it would fail.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.teacher_dump.arch_models import (ARCHITECTURES, build_arch_teacher,
                                            reference_logprobs)

K = 8
TOL = 2e-4  # fp32 on both sides; attention sums in a different order (observed <= 2e-5)
TIE_GAP = 1e-3
DRAWS = 4096


def _window(n_tokens: int = 160, split: int = 64, seed: int = 0):
    from kdcache.teacher_dump.pack import PackedWindow

    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 1000, size=n_tokens).astype(np.int64)
    return PackedWindow(window_index=seed, tokens=tokens,
                        doc_offsets=np.array([0, split, n_tokens], dtype=np.int64),
                        doc_ids=np.array([0, 1], dtype=np.int64),
                        doc_pieces=np.array([0, 0], dtype=np.int64))


def _engine_actor(model_dir: str, env_extra: dict | None = None, **cfg_kw):
    import ray

    from kdcache.teacher_dump.engines.base import EngineConfig
    from kdcache.teacher_dump.engines.vllm import VLLMEngine

    cfg = EngineConfig(model=model_dir, k=K + 1, window=512, mode="document", **cfg_kw)
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_CPU_KVCACHE_SPACE": "1", **(env_extra or {})}
    return ray.remote(VLLMEngine).options(num_cpus=1, max_restarts=0,
                                          runtime_env={"env_vars": env}).remote(cfg)


@pytest.fixture(scope="module")
def arch_targets(ray_address, teacher_dir, tmp_path_factory):
    """{arch: (model_dir, WindowTargets)} from the pooler path, one engine at a time."""
    import ray

    root = tmp_path_factory.mktemp("arch")
    win = _window()
    out = {}
    for name in ARCHITECTURES:
        model_dir = build_arch_teacher(name, str(root / name), teacher_dir)
        actor = _engine_actor(model_dir)
        try:
            out[name] = (model_dir, ray.get(actor.topk.remote([win]))[0])
            ray.get(actor.close.remote())
        finally:
            ray.kill(actor, no_restart=True)
    return win, out


def _compare(win, model_dir, got, **ref_kw):
    """max |d log-prob| by rank and the share of clear rows with equal top-k id sets."""
    worst, same = 0.0, []
    for s, e in zip(win.doc_offsets[:-1], win.doc_offsets[1:]):
        ref_ids, ref_lp = reference_logprobs(model_dir, win.tokens[s:e], K + 1, **ref_kw)
        rows = slice(s, e - 1)  # the last row of a document has no target in document mode
        ids, lps = got.ids[rows, :K], got.logprobs[rows, :K]
        clear = (ref_lp[:-1, K - 1] - ref_lp[:-1, K]) > TIE_GAP
        same.append((np.sort(ids[clear], 1) == np.sort(ref_ids[:-1, :K][clear], 1)).all(1))
        worst = max(worst, float(np.abs(lps - ref_lp[:-1, :K]).max()))
    return worst, float(np.concatenate(same).mean())


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_pooler_path_is_the_models_distribution(arch_targets, name):
    win, results = arch_targets
    model_dir, got = results[name]
    assert got.ids.dtype == np.int32 and got.logprobs.dtype == np.float32
    v = got.valid
    assert np.all(got.ids[v] >= 0) and np.all(np.diff(got.logprobs[v], axis=1) <= 0)
    worst, same = _compare(win, model_dir, got)
    assert same == 1.0 and worst <= TOL, (name, worst, same)
    if name in ("gemma2-softcap", "phi-bias"):
        # without the soft-cap / bias the targets are far off: the check above can fail
        wrong, _ = _compare(win, model_dir, got, without_feature=True)
        assert wrong > 100 * TOL, (name, wrong)
    if name == "llama-padded":
        assert got.ids[v].max() < 1090  # vLLM's internal padding rows never appear
        assert got.ids[v].max() >= 1024  # rows past the tokenizer are real model rows


@pytest.mark.slow
def test_sampled_draws_are_unbiased_and_reproducible(ray_address, teacher_dir):
    """RS-KD draws from softmax(z): per-id frequencies match the top-k probabilities within
    sampling error, each row's weights sum to 1, and the same request draws the same samples.
    vLLM schedules at most 48 tokens per step here, so every request's prefill is chunked:
    the pooler keeps each chunk's compact rows until the request's last chunk."""
    import ray

    win = _window(seed=3)
    actor = _engine_actor(teacher_dir, draws=DRAWS, max_num_batched_tokens=48)
    try:
        a = ray.get(actor.topk.remote([win]))[0]
        b = ray.get(actor.topk.remote([win]))[0]
        ray.get(actor.close.remote())
    finally:
        ray.kill(actor, no_restart=True)
    v = a.valid
    worst, same = _compare(win, teacher_dir, a)  # chunked prefill: still the model's top-k
    assert same == 1.0 and worst <= TOL, (worst, same)
    assert a.draw_ids.shape == (win.n_tokens, DRAWS) and a.draw_ids.dtype == np.int32
    np.testing.assert_array_equal(a.draw_ids, b.draw_ids)
    np.testing.assert_array_equal(a.draw_weights, b.draw_weights)
    np.testing.assert_allclose(a.draw_weights[v].sum(1), 1.0, atol=1e-5)
    assert np.all(a.draw_ids[~v] == -1) and np.all(a.draw_weights[~v] == 0)
    # frequency of each top-k id among the draws vs its probability (binomial z-scores)
    p = np.exp(a.logprobs[v])
    freq = np.zeros_like(p)
    for r, (ids, d_ids, d_w) in enumerate(zip(a.ids[v], a.draw_ids[v], a.draw_weights[v])):
        weight_of = dict(zip(d_ids.tolist(), d_w.tolist()))
        freq[r] = [weight_of.get(i, 0.0) for i in ids.tolist()]
    z = (freq - p) / np.sqrt(p * (1 - p) / DRAWS + 1e-12)
    assert np.abs(z).max() < 6.0, np.abs(z).max()
    assert abs(float(z.mean())) < 0.2  # no systematic bias over ~1,300 (row, id) pairs


@pytest.mark.slow
def test_sampled_dump_end_to_end(ray_address, teacher_dir, small_dump_config, tmp_path):
    """`kdcache dump --kind sampled --draws 50` through the runner and a Ray actor: a `sampled`
    dataset (qrank, counts) that verify accepts, weights = counts / 50 summing to 1."""
    import ray

    from kdcache.formats.reader import open_dataset
    from kdcache.formats.verify import verify_dataset
    from kdcache.teacher_dump.runner import run_dump
    from tests.teacher_dump.conftest import _start_worker

    worker = _start_worker("vllm", teacher_dir, vllm_path="pooler", draws=50)
    try:
        cfg = small_dump_config(teacher_dir, tmp_path / "sampled", engine="vllm", workers=1,
                                codec=None, draws=50, builtin_documents=8)
        summary = run_dump(cfg, actors=[worker])
    finally:
        ray.kill(worker, no_restart=True)
    assert summary["shards_written"] == summary["shards"] >= 1
    report = verify_dataset(str(tmp_path / "sampled"))
    assert report.ok, report.problems
    ds = open_dataset(str(tmp_path / "sampled"))
    h = ds.header
    assert h.kind == "sampled" and h.k == 50 and h.temperature == 1.0
    assert h.codec == "qrank" and h.codec_params["draws"] == 50
    w = ds[0]
    v = w.valid.numpy()
    weights = w.weights.numpy()[v]
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)
    counts = weights * 50
    np.testing.assert_allclose(counts, np.rint(counts), atol=1e-4)  # exact counts of 50 draws


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-padded", "phi-bias"])
def test_tensor_parallel_pooler_is_the_models_distribution(ray_address, teacher_dir,
                                                           tmp_path, name):
    """Two vLLM-CPU ranks: each holds half of the (padded) vocabulary and of the lm_head bias;
    the pooler's row blocks gather the model's logits across ranks, so the targets are the
    same as transformers' single-process forward."""
    import ray

    model_dir = build_arch_teacher(name, str(tmp_path / name), teacher_dir)
    win = _window(seed=5)
    import os

    # as the dump's actor pool starts it: the engine's CPUs as one list, split per rank here
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    actor = _engine_actor(model_dir, {"VLLM_CPU_OMP_THREADS_BIND": cpus}, tensor_parallel=2)
    try:
        got = ray.get(actor.topk.remote([win]))[0]
        ray.get(actor.close.remote())
    finally:
        ray.kill(actor, no_restart=True)
    worst, same = _compare(win, model_dir, got)
    assert same == 1.0 and worst <= TOL, (name, worst, same)
    if name == "phi-bias":
        wrong, _ = _compare(win, model_dir, got, without_feature=True)
        assert wrong > 100 * TOL, wrong  # a rank that dropped its share of the bias would fail


def test_pipeline_parallel_on_vllm_cpu_is_refused(teacher_dir):
    from kdcache.teacher_dump.engines.base import EngineConfig, EngineError
    from kdcache.teacher_dump.engines.vllm import VLLMEngine

    with pytest.raises(EngineError, match="vLLM-CPU cannot run pipeline parallel"):
        VLLMEngine(EngineConfig(model=teacher_dir, k=4, window=256, pipeline_parallel=2))


def test_cpu_ranks_get_an_equal_share_of_the_cpus(monkeypatch):
    from kdcache.teacher_dump.engines.base import EngineError
    from kdcache.vllm_start import cpu_bind_for_ranks

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {4, 5, 6, 7, 8})
    assert cpu_bind_for_ranks(2, EngineError) == "4,5|6,7"
    # one list (the actor pool's slice for an engine) is the engine's CPUs, split per rank
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0,1,2,3")
    assert cpu_bind_for_ranks(2, EngineError) == "0,1|2,3"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "2-5")
    assert cpu_bind_for_ranks(2, EngineError) == "2,3|4,5"
    with pytest.raises(EngineError, match="need at least 8 CPUs"):
        cpu_bind_for_ranks(8, EngineError)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    assert cpu_bind_for_ranks(2, EngineError) is None  # the user's own binding stays
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0,two")  # a typo: a clear error, no crash
    with pytest.raises(EngineError, match="is not a CPU list"):
        cpu_bind_for_ranks(2, EngineError)
