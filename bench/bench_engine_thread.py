"""What the dump's engine thread does per window besides the model: before vs after, on CPU.

    python bench/bench_engine_thread.py [--window 32768] [--windows 4] [--ks 16,256]
        [--modes causal,document] [--rates 16:60000,64:40000,256:15000] [--host-share 0.1]
        [--workers 2] [--rounds 2]

The H200 dump lost 10-33% against its engine at k=256 (BENCHMARKS.md, "Writer on 16 worker
processes, H200, 2026-12-02"), so something on the engine's critical path does O(rows x k) work.
No GPU here: `SimEngine` is the vLLM pooler engine's protocol on a simulated GPU. Its requests
are `VLLMEngine`'s (`request_layout`), its results what vLLM hands back (a fresh float32
[rows, 2k] array per request: the device-to-host copy is the engine's), realistic top-k at
V = 202,048 (kdcache.formats.synthetic), converted by the engine's own code (`raw_targets`).
The simulated GPU runs `--rates` tokens/s (per k: slower than this machine's encoder, as the
H200's engine is slower than its 16 workers) in steps of 16,384 tokens; per step the host
thread spends `--host-share` of the step's device time in Python (a guess for vLLM's eager
engine), half of it launching 250 ops (the GIL let go around every launch, as torch's dispatch
does), half after the step's synchronisation while the GPU waits (vLLM's scheduler and output
processing). Python elsewhere in the process delays the launches and that step work, and
busy cores delay the thread: that is how the writer slows a real engine down.

Side by side, interleaved, same windows, same process, the dump's real pipeline
(pipeline.ShardPipeline: converting, validation, qrank on `--workers` worker processes, Arrow,
atomic write; shards of 4 windows):
- before: the engine's thread converts each group's results into targets (the previous
  VLLMEngine.topk: `split_result` casts, copies into the window's arrays, blanking) and builds the
  records, then hands them to the writer;
- after: the engine's thread only computes; `VLLMEngine.finish` converts on the pipeline's
  converting thread.
Per side (medians): `wall_s` the whole dump, `engine_side_s` until the engine's thread is done
with the last window, `model_s` its time inside the simulated model (against `model_alone_s`:
the stretch is what other threads cost the engine), `serial_ms_per_window` the engine thread's
time outside the model per window, `tail_s` the writing after the engine is done. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kdcache.formats.manifest import DatasetHeader  # noqa: E402
from kdcache.formats.synthetic import synthetic_targets  # noqa: E402
from kdcache.formats.writer import prepare_codec  # noqa: E402
from kdcache.teacher_dump.engines.base import (EngineConfig, TeacherEngine,  # noqa: E402
                                               empty_targets, finish_targets)
from kdcache.teacher_dump.engines.vllm import RawTargets, raw_targets, request_layout  # noqa: E402
from kdcache.teacher_dump.pack import PackedWindow  # noqa: E402
from kdcache.teacher_dump.pipeline import ShardPipeline  # noqa: E402

VOCAB = 202_048
STEP_TOKENS = 16_384  # vLLM's default tokens per step on the H200
OPS_PER_STEP = 250  # kernel launches per step (12 layers x ~10, the pooler's ~13 blocks x ~8)


def _calibrate() -> float:
    """Iterations of `_spin` per microsecond on this machine (work, not wall time)."""
    n = 200_000
    t0 = time.perf_counter()
    _spin(n)
    return n / ((time.perf_counter() - t0) * 1e6)


def _spin(n: int) -> int:
    x = 0
    for i in range(n):
        x += i
    return x


class SimGPU:
    """A device that runs launched work asynchronously at `tokens_per_s` (see module doc)."""

    def __init__(self, tokens_per_s: float, spins_per_us: float, host_share: float) -> None:
        self.tokens_per_s = tokens_per_s
        host_us = host_share * STEP_TOKENS / tokens_per_s * 1e6  # per full step
        self.launch = max(1, int(host_us / 2 / OPS_PER_STEP * spins_per_us))
        self.step_host = max(1, int(host_us / 2 * spins_per_us))

    def run(self, tokens: int) -> None:
        for a in range(0, tokens, STEP_TOKENS):
            per_op = min(STEP_TOKENS, tokens - a) / self.tokens_per_s / OPS_PER_STEP
            device_done = time.perf_counter()
            for _ in range(OPS_PER_STEP):
                _spin(self.launch)
                time.sleep(0)  # torch lets go of the GIL around a launch; taking it back waits
                device_done = max(device_done, time.perf_counter()) + per_op
            wait = device_done - time.perf_counter()
            if wait > 0:
                time.sleep(wait)  # the step's synchronisation: GIL-free
            _spin(self.step_host)


class SimEngine(TeacherEngine):
    """VLLMEngine's requests and results on SimGPU; `finish` is the engine's own conversion."""

    name = "sim"
    modes = ("causal", "document")

    def __init__(self, cfg: EngineConfig, gpu: SimGPU, raw: dict[int, np.ndarray]) -> None:
        super().__init__(cfg)
        self.gpu, self.raw = gpu, raw  # window_index -> float32 [n, 2k], as the pooler's rows
        self.model_s = 0.0

    def compute(self, windows: list[PackedWindow]) -> RawTargets:
        t0 = time.perf_counter()
        self.gpu.run(sum(w.n_tokens for w in windows))
        where = request_layout(windows, self.cfg.mode)
        # vLLM copies each request's rows to the host: a fresh array per request
        datas = [self.raw[index][start:end].copy() for _, start, end, index in where]
        self.model_s += time.perf_counter() - t0
        return RawTargets(path="pooler", mode=self.cfg.mode, k=self.cfg.k, draws=0,
                          where=where, datas=datas)

    def finish(self, windows: list[PackedWindow], computed: RawTargets) -> list:
        return raw_targets(windows, computed)

    def topk(self, windows: list[PackedWindow]) -> list:
        return self.finish(windows, self.compute(windows))


class BeforeEngine(SimEngine):
    """The previous pipeline: all of topk on the engine's thread, with the previous conversion
    (`split_result` casts, then copies into the window's arrays)."""

    def compute(self, windows: list[PackedWindow]) -> list:
        raw = super().compute(windows)
        k = raw.k
        out = [empty_targets(win.n_tokens, k) for win in windows]
        for (w, start, end, _), data in zip(raw.where, raw.datas):
            ids = data[:, :k].astype(np.int32)
            lps = np.ascontiguousarray(data[:, k:2 * k], dtype=np.float32)
            out[w][0][start:end], out[w][1][start:end] = ids, lps
        return [finish_targets(win, raw.mode, ids, lps) for win, (ids, lps) in zip(windows, out)]

    def finish(self, windows: list[PackedWindow], computed: list) -> list:
        return computed


def make_windows(window: int, count: int, k: int, mode: str, seed: int = 0):
    """`count` packed windows (2 distinct target arrays, cycled) and their pooler rows."""
    rng = np.random.default_rng(seed)
    wins, raw, pool = [], {}, []
    for i in range(count):
        lengths, total = [], 0
        while total < window:
            lengths.append(min(int(rng.integers(64, 1024)), window - total))
            total += lengths[-1]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = rng.integers(3, 2048, size=window).astype(np.int32)
        wins.append(PackedWindow(window_index=i, tokens=tokens, doc_offsets=offsets,
                                 doc_ids=np.arange(len(lengths), dtype=np.int64) + 1000 * i,
                                 doc_pieces=np.zeros(len(lengths), dtype=np.int32)))
        if len(pool) < 2:
            ids, lps = synthetic_targets(rng, window, VOCAB, k)
            pool.append(np.concatenate([ids.astype(np.float32), lps], axis=1))
        raw[i] = pool[i % len(pool)]
    return wins, raw


def one_dump(engine: SimEngine, wins, header, codec, out: str, workers: int) -> dict:
    pipeline = ShardPipeline(engine)
    try:
        engine.model_s = 0.0
        t0 = time.perf_counter()
        futures = [pipeline.start(out, f"shard-{i // 4:05d}", wins[i:i + 4], header, codec,
                                  encode_workers=workers) for i in range(0, len(wins), 4)]
        engine_side = time.perf_counter() - t0
        infos = [f.result() for f in futures]
        wall = time.perf_counter() - t0
    finally:
        pipeline.close()
    return {"wall_s": wall, "engine_side_s": engine_side, "model_s": engine.model_s,
            "xxh3": [i.xxh3 for i in infos]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=32768)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ks", default="16,256")
    ap.add_argument("--modes", default="causal,document")
    ap.add_argument("--rates", default="16:60000,64:40000,256:15000",
                    help="simulated engine tokens/s per k")
    ap.add_argument("--host-share", type=float, default=0.1,
                    help="the engine thread's Python per step, as a share of the step")
    ap.add_argument("--workers", type=int, default=2, help="encode worker processes")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rates = {int(a): float(b) for a, b in (x.split(":") for x in args.rates.split(","))}
    spins = _calibrate()
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            for k in (int(x) for x in args.ks.split(",")):
                wins, raw = make_windows(args.window, args.windows, k, mode)
                tokens = sum(w.n_tokens for w in wins)
                gpu = SimGPU(rates[k], spins, args.host_share)
                cfg = EngineConfig(model="sim", k=k, window=args.window, mode=mode)
                header = DatasetHeader(kind="topk", k=k, vocab_size=VOCAB, codec="qrank",
                                       packing={"window": args.window, "mode": mode})
                codec = prepare_codec(header, sample_ids=raw[0][:, :k].astype(np.int64))
                sides = {"before": BeforeEngine(cfg, gpu, raw), "after": SimEngine(cfg, gpu, raw)}
                alone = []
                runs: dict[str, list[dict]] = {s: [] for s in sides}
                for r in range(args.rounds + 1):  # round 0: warm-up (workers, numba, caches)
                    t0 = time.perf_counter()
                    gpu.run(tokens)
                    alone.append(time.perf_counter() - t0)
                    for side, engine in sides.items():
                        res = one_dump(engine, wins, header, codec,
                                       os.path.join(tmp, f"{mode}{k}{side}{r}"), args.workers)
                        if r:
                            runs[side].append(res)
                model_alone = statistics.median(alone[1:])
                cell = {"mode": mode, "k": k, "tokens": tokens, "windows": len(wins),
                        "engine_tokens_per_s": rates[k], "model_alone_s": round(model_alone, 3)}
                for side, rs in runs.items():
                    med = {key: statistics.median(r[key] for r in rs)
                           for key in ("wall_s", "engine_side_s", "model_s")}
                    cell[side] = {
                        "wall_s": round(med["wall_s"], 3),
                        "engine_side_s": round(med["engine_side_s"], 3),
                        "model_s": round(med["model_s"], 3),
                        "model_stretch": round(med["model_s"] / model_alone, 3),
                        "serial_ms_per_window": round(
                            1e3 * (med["engine_side_s"] - med["model_s"]) / len(wins), 1),
                        "tail_s": round(med["wall_s"] - med["engine_side_s"], 3),
                        "dump_tokens_per_s": round(tokens / med["wall_s"]),
                        "dump_over_engine": round(model_alone / med["wall_s"], 3)}
                cell["same_bytes"] = len({tuple(r["xxh3"]) for rs in runs.values()
                                          for r in rs}) == 1
                cells.append(cell)
                print(json.dumps(cell), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "engine_thread", "window": args.window, "vocab_size": VOCAB,
                      "host_share": args.host_share, "workers": args.workers, "rounds": args.rounds,
                      "cpus": len(os.sched_getaffinity(0)),
                      "load_avg_1m": round(os.getloadavg()[0], 2),
                      "threads": threading.active_count(), "cells": cells}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
