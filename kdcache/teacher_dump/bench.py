"""`kdcache bench dump`: top-k extraction throughput against the work no implementation can skip.

    ceiling_tokens_per_s = tokens / (t_prefill + t_extra)
    ratio                = dump_tokens_per_s / ceiling_tokens_per_s

- t_prefill: the same engine's prefill-only time on the same windows (vLLM `generate` with
  `max_tokens=1` and prompt log-probs off; for the hf engine, the backbone forward alone).
- t_extra: the unavoidable extra work on the same device and threads: the lm_head matmul over
  every prompt token plus one pass over those logits for logsumexp and top-k, chunked PyTorch
  (`chunked_topk` on hidden states of the same size).
- dump: everything a dump does per window after packing: top-k computed (vLLM `hidden` path:
  backbone + chunked top-k), converted, validated, encoded by the default codec and written to an
  Arrow shard atomically.
- baseline (side by side, same process): vLLM's own `prompt_logprobs=k, flat_logprobs=True`
  path through the same conversion, encoding and writing.

Timings are interleaved over `rounds` rounds and the median is reported, because the machine may
be shared. Engine start-up and the first (warm-up) call are excluded.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from kdcache.formats.codecs import default_codec
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.writer import default_encode_threads, prepare_codec, shard_name
from kdcache.teacher_dump.corpus import CorpusSpec, CorpusStats, iter_documents
from kdcache.teacher_dump.engines import make_engine
from kdcache.teacher_dump.engines.base import EngineConfig, chunked_topk, segments_for_mode
from kdcache.teacher_dump.pack import PackConfig, PackStats, TeacherTokenizer, pack_documents
from kdcache.teacher_dump.plan import teacher_fingerprint
from kdcache.teacher_dump.pipeline import ShardPipeline


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
    windows_per_shard: int = 4  # the timed windows are written as shards of this many


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


class DumpBench:
    """Started engines (the dump engine and, for vLLM, the prompt-logprobs baseline, which also
    serves prefill-only) reused across measurements of several k and windows."""

    def __init__(self, model: str, engine: str = "vllm", *, max_k: int = 256,
                 max_window: int = 8192, mode: str = "causal", baseline: bool = True,
                 dtype: str = "float32") -> None:
        if hasattr(os, "sched_getaffinity"):  # in-process engine: use every core we have
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                                  ",".join(map(str, sorted(os.sched_getaffinity(0)))))
        self.model, self.engine_name, self.mode = model, engine, mode
        self.vocab = teacher_fingerprint(model)["vocab_size"]
        ecfg = EngineConfig(model=model, k=max_k, window=max_window, mode=mode, device="auto",
                            dtype=dtype)
        t0 = time.perf_counter()
        self.engine = make_engine(engine, ecfg)
        self.start_s = time.perf_counter() - t0
        self.base = None
        if engine == "vllm":
            self.base = make_engine("vllm", EngineConfig(**{**vars(ecfg),
                                                           "vllm_path": "prompt-logprobs"}))
        self.baseline = baseline and self.base is not None
        self.weight = self.engine.weight
        self.tmp = tempfile.mkdtemp(prefix="kdcache-bench-")
        self._names = iter(range(10**9))

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        for eng in (self.engine, self.base):
            if eng is not None:
                eng.close()

    def _header(self, k: int, window: int):
        header = DatasetHeader(kind="topk", k=k, vocab_size=self.vocab,
                               codec=default_codec("topk"),
                               packing={"window": window, "mode": self.mode})
        return header, prepare_codec(header)

    def dump_fn(self, eng, windows, k: int, window: int, windows_per_shard: int = 4):
        """What a dump worker does (pipeline.ShardPipeline, the dump's own code): the windows cut
        into shards, the engine called on ~16k-token groups on this thread while the writer's
        threads encode the previous group and finish the previous shard."""
        header, codec = self._header(k, window)
        pipeline = ShardPipeline(eng)

        def run() -> None:
            shards = [(shard_name(next(self._names)), windows[i:i + windows_per_shard])
                      for i in range(0, len(windows), windows_per_shard)]
            pipeline.write_all(self.tmp, shards, header, codec)
        return run

    def measure(self, cfg: BenchConfig) -> dict:
        import torch

        windows = bench_windows(cfg)
        tokens = int(sum(w.n_tokens for w in windows))
        for eng in (self.engine, self.base):
            if eng is not None:
                eng.reconfigure(k=cfg.k, mode=cfg.mode, window=cfg.window)
        gen = torch.Generator().manual_seed(0)
        hidden = (torch.randn(tokens, int(self.weight.shape[1]), generator=gen) * 0.5).to(
            self.weight.device, self.weight.dtype)

        def extra() -> None:
            chunked_topk(hidden, self.weight, cfg.k)

        timers = {"prefill": _prefill_fn(cfg, self.engine, self.base, windows), "extra": extra,
                  "dump": self.dump_fn(self.engine, windows, cfg.k, cfg.window,
                                       cfg.windows_per_shard)}
        if self.baseline and cfg.baseline:
            timers["baseline"] = self.dump_fn(self.base, windows, cfg.k, cfg.window,
                                              cfg.windows_per_shard)
        for fn in timers.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in timers}
        for _ in range(cfg.rounds):
            for name, fn in timers.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        ceiling = tokens / (med["prefill"] + med["extra"])
        result = {
            "bench": "dump", "engine": self.engine_name, "k": cfg.k, "window": cfg.window,
            "windows": len(windows), "tokens": tokens, "vocab_size": self.vocab,
            "hidden_size": int(self.weight.shape[1]),
            "codec": self._header(cfg.k, cfg.window)[0].codec,
            "prefill_tokens_per_s": round(tokens / med["prefill"], 1),
            "extra_tokens_per_s": round(tokens / med["extra"], 1),
            "ceiling_tokens_per_s": round(ceiling, 1),
            "dump_tokens_per_s": round(tokens / med["dump"], 1),
            "ratio": round(tokens / med["dump"] / ceiling, 3),
            "engine_start_s": round(self.start_s, 1), "rounds": cfg.rounds,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "encode_threads": default_encode_threads(), "dtype": str(self.weight.dtype),
            "device": str(self.weight.device),
        }
        if "baseline" in med:
            result["baseline"] = "vllm prompt_logprobs flat"
            result["baseline_tokens_per_s"] = round(tokens / med["baseline"], 1)
            result["baseline_ratio"] = round(tokens / med["baseline"] / ceiling, 3)
        return result


def bench_dump(cfg: BenchConfig) -> dict:
    """One measurement (the `kdcache bench dump` command)."""
    bench = DumpBench(cfg.model, cfg.engine, max_k=cfg.k, max_window=cfg.window, mode=cfg.mode,
                      baseline=cfg.baseline, dtype=cfg.dtype)
    try:
        return bench.measure(cfg)
    finally:
        bench.close()


def _prefill_fn(cfg: BenchConfig, engine, base, windows):
    """Prefill-only on the same windows: what the teacher costs with no targets at all."""
    if base is not None:
        from vllm import SamplingParams

        prompts = [{"prompt_token_ids": w.tokens[s:e].tolist()}
                   for w in windows for s, e, _ in segments_for_mode(w, cfg.mode)]
        params = SamplingParams(max_tokens=1, detokenize=False)

        def run() -> None:
            base.llm.generate(prompts, params, use_tqdm=False)
        return run

    def run_hf() -> None:
        for w in windows:
            for s, e, p in segments_for_mode(w, cfg.mode):
                engine.hidden_states(w.tokens[s:e], p)
        if engine.device == "cuda":
            import torch

            torch.cuda.synchronize()
    return run_hf


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares seconds per token of (tokens, seconds) points."""
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0])
