"""`kdcache bench dump`: dump throughput against the work no implementation can skip.

    ceiling_tokens_per_s = tokens / (t_prefill + t_extra)
    ratio                = dump_tokens_per_s / ceiling_tokens_per_s

- t_prefill: the teacher's prefill-only time on the same requests (vLLM `generate` with
  `max_tokens=1` and prompt log-probs off; for the hf engine, the backbone forward alone).
- t_extra: the unavoidable extra work on the same device: the lm_head matmul over every prompt
  token plus one pass over those logits for logsumexp and top-k (`chunked_topk` on random hidden
  states of the same size, the checkpoint's lm_head weight in the engine's dtype).
- dump: everything a dump worker does after packing: targets computed (vLLM `pooler` path: top-k
  inside vLLM's worker), converted, validated, encoded by the default codec and written as Arrow
  shards of `windows_per_shard` windows atomically, each shard written while the engine computes
  the next (pipeline.ShardPipeline, the dump's own code). Also reported: `dump_engine_side`,
  until the engine's thread is done with the last window (a long dump's pace, when the writer
  keeps up), and `dump_tail_s`, the writing after that (once per run in a real dump).
- engine: the engine's `topk` alone on every window in one call, and (`engine_grouped`, one
  round) in the dump's groups (engine_call_tokens), one call each; for an engine that queues ahead,
  `engine_fed` (one round): the same groups, each queued before the last is collected.
- feed: the dump queues the next group ahead when the engine can (a ShardPipeline option;
  pipeline.computed_groups); `compare_blocking` also times the same dump with one blocking
  engine call per group (`dump_blocking_*`, `ratio_blocking`), side by side on the same engine.
- baseline (side by side): vLLM's own `prompt_logprobs=k, flat_logprobs=True` path through the
  same conversion, encoding and writing.

Engines run one at a time (dump engine, then the prompt-logprobs engine that also times
prefill, then the extra pass), each closed and its memory released before the next starts, so
that the bench runs on one GPU. Each timing is the median of `rounds` runs after a warm-up on
the first `WARMUP_WINDOWS` windows (every shape and code path, not the whole time again);
engine start-up is excluded.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Callable

from kdcache.formats.codecs import default_codec
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.writer import default_encode_workers, prepare_codec
from kdcache.teacher_dump.corpus import CorpusSpec, CorpusStats, iter_documents
from kdcache.teacher_dump.engines import make_engine
from kdcache.teacher_dump.engines.base import (EngineConfig, check_feed_caps, chunked_topk,
                                               segments_for_mode)
from kdcache.teacher_dump.pack import PackConfig, PackStats, TeacherTokenizer, pack_documents
from kdcache.teacher_dump.plan import teacher_fingerprint
from kdcache.teacher_dump.pipeline import ShardPipeline, engine_call_tokens, grouped_targets



@dataclass
class BenchConfig:
    model: str
    corpus: str = "builtin"
    k: int = 64
    window: int = 8192
    windows: int = 4
    engine: str = "vllm"
    rounds: int = 3
    baseline: bool = True
    mode: str = "causal"
    dtype: str = "float32"  # the engine's weights and activations (bfloat16 on a GPU)
    gpu_memory_utilization: float | None = None
    windows_per_shard: int = 16  # the timed windows are written as shards of this many (the
    #                              dump's default --windows-per-shard)
    encode_workers: int | None = None  # the dump's --encode-workers (None: its default)
    feed: bool = False  # the dump queues the next group ahead when the engine can (off, as in
    #                     the dump: ShardPipeline's default)
    compare_blocking: bool = False  # also time the dump with one blocking call per group
    call_tokens: int | None = None  # the dump's engine groups (None: the dump's, by k)
    # fed: caps on the requests / prompt tokens in vLLM's engine (None: from its scheduler)
    feed_max_requests: int | None = None
    feed_max_tokens: int | None = None

    def __post_init__(self) -> None:
        check_feed_caps(self.feed_max_requests, self.feed_max_tokens)  # before any engine starts


WARMUP_WINDOWS = 2


def bench_windows(cfg: BenchConfig):
    """`cfg.windows` packed windows (the built-in corpus is made as large as needed)."""
    tok = TeacherTokenizer(cfg.model)
    n_docs = max(64, cfg.window * (cfg.windows + 1) // 100)
    docs = iter_documents(CorpusSpec(cfg.corpus, builtin_documents=n_docs), CorpusStats())
    wins = []
    for w in pack_documents(docs, tok, PackConfig(window=cfg.window, seed=0), PackStats()):
        wins.append(w)
        if len(wins) == cfg.windows:
            break
    return wins


def lm_head_weight(model_dir: str):
    """The checkpoint's output matrix [V, d] (tied: the input embedding), for the extra pass."""
    from safetensors import safe_open

    # an untied head is found first; a tied one is the input embedding
    names = ["lm_head.weight", "language_model.lm_head.weight", "model.embed_tokens.weight",
             "model.language_model.embed_tokens.weight", "transformer.wte.weight"]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    for name in names:
        for f in files:
            with safe_open(os.path.join(model_dir, f), framework="pt") as st:
                if name in st.keys():
                    return st.get_tensor(name)
    raise FileNotFoundError(f"{model_dir}: no output matrix among {names}")


def _timed(fn: Callable[[], object], rounds: int,
           warmup: Callable[[], object] | None = None) -> list[tuple[float, object]]:
    """(seconds, result) of `rounds` calls of `fn` after one call of `warmup` (default: fn)."""
    return _alternating([fn], rounds, [warmup or fn])[0]


def _alternating(fns: list[Callable[[], object]], rounds: int,
                 warmups: list[Callable[[], object]]) -> list[list[tuple[float, object]]]:
    """`_timed` for several functions side by side: each warmed up, then `rounds` rounds that
    call each once in turn (drift on a shared machine falls on all of them alike)."""
    for warmup in warmups:
        warmup()
    out: list[list[tuple[float, object]]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, runs in zip(fns, out):
            t0 = time.perf_counter()
            result = fn()
            runs.append((time.perf_counter() - t0, result))
    return out


def _median_seconds(fn: Callable[[], object], rounds: int,
                    warmup: Callable[[], object] | None = None) -> float:
    return statistics.median(t for t, _ in _timed(fn, rounds, warmup))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Writer:
    """What a dump worker does for one shard, with a fresh shard name per call."""
    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.tmp = tempfile.mkdtemp(prefix="kdcache-bench-")
        self._names = iter(range(10**9))
        self._pipelines: list = []

    def header(self, k: int, window: int, mode: str):

        header = DatasetHeader(kind="topk", k=k, vocab_size=self.vocab,
                               codec=default_codec("topk"),
                               packing={"window": window, "mode": mode})
        return header, prepare_codec(header)

    def dump_fn(self, engine, windows, c: BenchConfig,
                feed: bool | None = None) -> Callable[[], float]:
        """What a dump worker does (pipeline.ShardPipeline, the dump's own code): the windows cut
        into shards, the engine called on the dump's groups (engine_call_tokens) on this thread
        while the writer's threads encode the previous group and finish the previous shard. The
        function returns the seconds until the engine's thread was done with the last shard.
        `feed`: None for the config's."""
        header, codec = self.header(c.k, c.window, c.mode)
        pipeline = ShardPipeline(engine, call_tokens=c.call_tokens,
                                 feed=c.feed if feed is None else feed)
        self._pipelines.append(pipeline)
        step = c.windows_per_shard

        def run() -> float:
            t0 = time.perf_counter()
            written = [pipeline.start(self.tmp, f"shard-{next(self._names):05d}",
                                      windows[i:i + step], header, codec, c.encode_workers)
                       for i in range(0, len(windows), step)]
            engine_side = time.perf_counter() - t0
            for future in written:
                future.result()
            return engine_side
        return run

    def close(self) -> None:
        for pipeline in self._pipelines:
            pipeline.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _engine(name: str, cfgs: list[BenchConfig], **overrides):
    """One engine that serves every config (largest k and window)."""
    if hasattr(os, "sched_getaffinity"):  # in-process engine: use every core we have
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                              ",".join(map(str, sorted(os.sched_getaffinity(0)))))
    c = cfgs[0]
    util = c.gpu_memory_utilization
    if util is None and name == "vllm":
        util = _free_gpu_share()
    ecfg = EngineConfig(model=c.model, k=max(x.k for x in cfgs),
                        window=max(x.window for x in cfgs), mode=c.mode, device="auto",
                        dtype=c.dtype, gpu_memory_utilization=util, **overrides)
    t0 = time.perf_counter()
    engine = make_engine(name, ecfg)
    return engine, time.perf_counter() - t0


def _free_gpu_share() -> float | None:
    """vLLM's default share of the GPU, or less if something else still holds memory."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
    except Exception:
        return None
    return round(min(0.9, 0.95 * free / total), 3)


def bench_many(cfgs: list[BenchConfig], log: Callable[[str], None] = lambda m: None,
               captured: dict | None = None) -> list[dict]:
    """One result per config; engines started once each, one at a time (see module doc).
    All configs share the model, engine and dtype. `captured`, if given, receives each engine's
    raw targets for the first window of each config: {(path, k, window, mode): WindowTargets}
    (path: "pooler", "prompt-logprobs" or "hf"), for agreement checks on the same device."""
    import torch


    first = cfgs[0]
    if any((c.model, c.engine, c.dtype) != (first.model, first.engine, first.dtype)
           for c in cfgs):
        raise ValueError("bench_many: every config must share model, engine and dtype")
    vocab = int(teacher_fingerprint(first.model)["vocab_size"])
    windows = [bench_windows(c) for c in cfgs]
    results = [{"bench": "dump", "engine": c.engine, "mode": c.mode, "k": c.k,
                "window": c.window, "windows": len(w),
                "tokens": int(sum(x.n_tokens for x in w)), "vocab_size": vocab,
                "rounds": c.rounds, "dtype": c.dtype,
                "call_tokens": c.call_tokens or engine_call_tokens(c.k)}  # the dump's groups
               for c, w in zip(cfgs, windows)]
    seconds: list[dict[str, float]] = [{} for _ in cfgs]
    writer = _Writer(vocab)

    def capture(path: str, engine, c: BenchConfig, wins) -> None:
        if captured is not None:
            captured[(path, c.k, c.window, c.mode)] = engine.topk(wins[:1])[0]
    try:
        # 1. the dump engine: whole dump (targets + conversion + encoding + writing)
        engine, start_s = _engine(first.engine, cfgs)
        try:
            for c, wins, sec, res in zip(cfgs, windows, seconds, results):
                engine.reconfigure(k=c.k, mode=c.mode, window=c.window)
                if engine.feeds:  # this config's caps, and a fresh count of what they held
                    engine.limit_feed(c.feed_max_requests, c.feed_max_tokens)
                # the dump as configured, and (compare_blocking) the same dump with one blocking
                # call per group: same engine and windows, rounds alternating between the two
                feeds = [c.feed] + ([False] if c.compare_blocking and c.feed and engine.feeds
                                    else [])
                timed = _alternating([writer.dump_fn(engine, wins, c, feed=f) for f in feeds],
                                     c.rounds, [writer.dump_fn(engine, wins[:WARMUP_WINDOWS],
                                                               c, feed=f) for f in feeds])
                for key, runs in zip(("dump", "dump_blocking"), timed):
                    sec[key] = statistics.median(t for t, _ in runs)
                    sec[f"{key}_engine_side"] = statistics.median(e for _, e in runs)
                sec["dump_tail"] = statistics.median(t - e for t, e in timed[0])
                sec["engine"] = _median_seconds(lambda: engine.topk(wins), c.rounds,
                                                lambda: engine.topk(wins[:WARMUP_WINDOWS]))
                # the same, called in the dump's groups (one round, warm by now): what the
                # calls themselves cost against one call of every window
                call = res["call_tokens"]
                sec["engine_grouped"] = _median_seconds(
                    lambda: grouped_targets(engine, wins, call), 1, lambda: None)
                if engine.feeds:  # the same groups, each queued before the last is collected
                    sec["engine_fed"] = _median_seconds(
                        lambda: grouped_targets(engine, wins, call, feed=True), 1,
                        lambda: None)
                capture("pooler" if first.engine == "vllm" else "hf", engine, c, wins)
                if c.feed and engine.feeds:
                    res["feed_limits"] = engine.feed_stats()  # caps, peaks, steps for room
                res["engine_start_s"] = round(start_s, 1)
                if first.engine == "hf":  # prefill-only: the backbone alone, same engine
                    sec["prefill"] = _median_seconds(
                        lambda: _hf_prefill(engine, wins, c.mode), c.rounds,
                        lambda: _hf_prefill(engine, wins[:WARMUP_WINDOWS], c.mode))
                log(f"bench dump: {c.engine} k={c.k} window={c.window} {c.mode}: "
                    f"{res['tokens'] / sec['dump']:,.0f} tok/s")
        finally:
            engine.close()
            del engine
        # 2. vLLM: prefill-only and the prompt-logprobs baseline, on their own engine
        if first.engine == "vllm":
            base, _ = _engine("vllm", cfgs, vllm_path="prompt-logprobs")
            try:
                for c, wins, sec in zip(cfgs, windows, seconds):
                    base.reconfigure(k=c.k, mode=c.mode, window=c.window)
                    sec["prefill"] = _median_seconds(lambda: base.prefill(wins), c.rounds,
                                                     lambda: base.prefill(wins[:WARMUP_WINDOWS]))
                    if c.baseline:
                        sec["baseline"] = _median_seconds(
                            writer.dump_fn(base, wins, c), c.rounds,
                            writer.dump_fn(base, wins[:WARMUP_WINDOWS], c))
                        capture("prompt-logprobs", base, c, wins)
            finally:
                base.close()
                del base
        # 3. the extra pass: lm_head + logsumexp + top-k on the same device, same dtype
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, first.dtype)
        weight = lm_head_weight(first.model).to(device, dtype)
        gen = torch.Generator().manual_seed(0)
        for c, sec, res in zip(cfgs, seconds, results):
            hidden = (torch.randn(res["tokens"], int(weight.shape[1]), generator=gen) * 0.5).to(
                device, dtype)

            def extra(rows: int | None = None) -> None:
                chunked_topk(hidden[:rows], weight, c.k)
                _sync()
            warm_rows = max(1, res["tokens"] * WARMUP_WINDOWS // max(1, res["windows"]))
            sec["extra"] = _median_seconds(extra, c.rounds, lambda: extra(warm_rows))
            del hidden
        hidden_size = int(weight.shape[1])
        del weight
    finally:
        writer.close()
    for c, sec, res in zip(cfgs, seconds, results):
        tokens = res["tokens"]
        ceiling = tokens / (sec["prefill"] + sec["extra"])
        res.update({
            "hidden_size": hidden_size, "codec": writer.header(c.k, c.window, c.mode)[0].codec,
            "prefill_tokens_per_s": round(tokens / sec["prefill"], 1),
            "extra_tokens_per_s": round(tokens / sec["extra"], 1),
            "ceiling_tokens_per_s": round(ceiling, 1),
            "dump_tokens_per_s": round(tokens / sec["dump"], 1),
            "dump_engine_side_tokens_per_s": round(tokens / sec["dump_engine_side"], 1),
            "dump_engine_side_ratio": round(tokens / sec["dump_engine_side"] / ceiling, 3),
            "dump_tail_s": round(sec["dump_tail"], 3), "windows_per_shard": c.windows_per_shard,
            # the targets alone (no conversion, encoding or writing): the engine's own ratio
            "engine_tokens_per_s": round(tokens / sec["engine"], 1),
            "engine_ratio": round(tokens / sec["engine"] / ceiling, 3),
            "engine_grouped_tokens_per_s": round(tokens / sec["engine_grouped"], 1),
            "feed": bool(c.feed and "engine_fed" in sec),
            "ratio": round(tokens / sec["dump"] / ceiling, 3),
            "vllm_path": "pooler" if c.engine == "vllm" else None,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "encode_workers": c.encode_workers or default_encode_workers(), "device": device,
        })
        if "engine_fed" in sec:
            res["engine_fed_tokens_per_s"] = round(tokens / sec["engine_fed"], 1)
        if "dump_blocking" in sec:  # the same dump, one blocking engine call per group
            res.update({
                "dump_blocking_tokens_per_s": round(tokens / sec["dump_blocking"], 1),
                "dump_blocking_engine_side_tokens_per_s": round(
                    tokens / sec["dump_blocking_engine_side"], 1),
                "ratio_blocking": round(tokens / sec["dump_blocking"] / ceiling, 3)})
        if "baseline" in sec:
            res["baseline"] = "vllm prompt_logprobs flat"
            res["baseline_tokens_per_s"] = round(tokens / sec["baseline"], 1)
            res["baseline_ratio"] = round(tokens / sec["baseline"] / ceiling, 3)
    return results


def bench_dump(cfg: BenchConfig) -> dict:
    """One measurement (the `kdcache bench dump` command)."""
    return bench_many([cfg])[0]


def bench_series(base: BenchConfig, ks: list[int], windows: list[tuple[int, int]]):
    """Configs for every k at every (window, number of windows)."""
    return [replace(base, k=k, window=w, windows=n) for w, n in windows for k in ks]


def _hf_prefill(engine, windows, mode: str) -> None:

    for w in windows:
        for s, e, p in segments_for_mode(w, mode):
            engine.hidden_states(w.tokens[s:e], p)
    if engine.device == "cuda":
        _sync()
