"""Teacher-dump figures on one GPU with vLLM (the `pooler` path), side by side with vLLM's
prompt-logprobs path and the hf engine, and the targets checked against the hf engine.

    python bench/gpu_vllm_dump.py teachers      # build gpu-1b and the Llama-3-8B-shaped teacher
    python bench/gpu_vllm_dump.py gpu1b         # every figure on gpu-1b (+ agreement check)
    python bench/gpu_vllm_dump.py big           # the 8B-shaped teacher, 32k windows, k=64
    python bench/gpu_vllm_dump.py smoke         # the same code on a tiny teacher (CPU or GPU)
    python bench/gpu_vllm_dump.py writer        # builds gpu-1b if missing; whole dump vs ceiling,
                                                # k = 16/64/256, 8k and 32k, causal then document
    python bench/gpu_vllm_dump.py writer-smoke  # the same on a tiny teacher (CPU: tests the path)
    WRITER_CELLS=causal:32768:256,... python bench/gpu_vllm_dump.py writer   # only those cells
    WRITER_CELLS=causal:8192:16:65536:6,...  # a cell with 65,536-token engine groups, 6 encoders
    WRITER_CELLS=causal:131072:64            # another window: as many tokens as the 8k cells
    WRITER_FEED=both|fed|blocking WRITER_ROUNDS=3 WRITER_SCALE=4 ... writer
        # the dump's engine calls: fed (the next group queued before this one is collected,
        # ShardPipeline(feed=True)), blocking (one vLLM call per group: the dump's default),
        # or both side by side on one engine (default: `dump_*` fed, `dump_blocking_*`
        # blocking); rounds per timing
        # (default 2); SCALE x the windows per cell (shards stay 16 windows);
        # WRITER_CALL_TOKENS: the engine groups' tokens (default: the dump's 16384; smoke 1024)
        # WRITER_FEED_MAX_REQUESTS / _TOKENS: the fed engine's caps on requests / prompt tokens
        # in vLLM's queue (default: twice a scheduler step's); caps and peaks in `feed_limits`

Writes JSON lines to $OUT/gpu_vllm_dump.jsonl (and prints them). Engines run one at a time in
this process (kdcache.teacher_dump.bench), memory released between them. Teachers are random
init (timing does not depend on the weights); the 8B-shaped one (32 layers, 4096 wide, 14,336
MLP, 32/8 heads, V = 128,256) is built in bf16 directly on the GPU.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

OUT = os.environ.get("OUT", "out")
ROOT = os.environ.get("KDCACHE_GPU_TEACHERS", "/tmp/kdcache-teachers")
GPU_1B = os.path.join(ROOT, "gpu-1b")
BIG = os.path.join(ROOT, "llama3-8b-shape")
TINY = os.path.join(ROOT, "tiny")


def emit(record: dict) -> None:
    os.makedirs(OUT, exist_ok=True)
    line = json.dumps(record)
    print(line, flush=True)
    with open(os.path.join(OUT, "gpu_vllm_dump.jsonl"), "a") as fh:
        fh.write(line + "\n")


def build_teachers() -> None:
    from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher

    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(GPU_1B, "config.json")):
        build_teacher(GPU_1B, TeacherConfig.preset("gpu-1b"), log=lambda m: None)
    emit({"step": "teacher", "name": "gpu-1b", "seconds": round(time.perf_counter() - t0, 1)})
    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(BIG, "config.json")):
        build_big(BIG, tokenizer_from=GPU_1B)
    emit({"step": "teacher", "name": "llama3-8b-shape",
          "seconds": round(time.perf_counter() - t0, 1)})


def build_big(out: str, tokenizer_from: str) -> None:
    """A random-init Llama-3-8B-shaped model in bf16, initialised on the GPU (the tokenizer is
    gpu-1b's 2,048 tokens: the model's 128,256 rows are a padded vocabulary)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                      torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)
    del model
    torch.cuda.empty_cache()


def agreement(captured: dict, ref_path: str, path: str) -> list[dict]:
    """Top-k id sets on rows without near-ties (gap between ranks k and k+1 of the reference
    above 1e-2 nats, bf16) and |log-prob difference| by rank, `path` against `ref_path`."""
    import numpy as np

    rows = []
    for (p, k, window, mode), ref in captured.items():
        other = captured.get((path, k, window, mode))
        if p != ref_path or other is None:
            continue
        v = ref.valid & other.valid
        lr, lo = ref.logprobs[v], other.logprobs[v]
        ir, io = ref.ids[v], other.ids[v]
        gap = lr[:, -2] - lr[:, -1] if k > 1 else np.full(len(lr), np.inf)
        clear = gap > 1e-2
        same_set = (np.sort(ir, 1) == np.sort(io, 1)).all(1)
        diff = np.abs(lr - lo)
        rows.append({"step": "agreement", "ref": ref_path, "path": path, "k": k,
                     "window": window, "mode": mode, "rows": int(v.sum()),
                     "rows_clear": int(clear.sum()),
                     "set_equal_clear": round(float(same_set[clear].mean()), 4)
                     if clear.any() else None,
                     "set_equal_all": round(float(same_set.mean()), 4),
                     "top1_equal": round(float((ir[:, 0] == io[:, 0]).mean()), 4),
                     "max_abs_dlogprob": float(diff.max()),
                     "median_abs_dlogprob": float(np.median(diff)),
                     "max_abs_dlogprob_by_rank": [round(float(x), 5) for x in
                                                  diff.max(0)[[0, k // 4, k // 2, k - 1]]]})
    return rows


def run_series(model: str, cfgs, label: str, compare: bool = True) -> None:
    from kdcache.teacher_dump.bench import bench_many

    captured: dict = {}
    t0 = time.perf_counter()
    for r in bench_many(cfgs, log=lambda m: print(m, file=sys.stderr, flush=True),
                        captured=captured):
        emit({"step": "bench", "teacher": label, **r})
    emit({"step": "series_done", "teacher": label, "engine": cfgs[0].engine,
          "seconds": round(time.perf_counter() - t0, 1)})
    return captured


def gpu1b(smoke: bool = False) -> None:
    from dataclasses import replace

    from kdcache.teacher_dump.bench import BenchConfig

    model = TINY if smoke else GPU_1B
    dtype = "float32" if smoke else "bfloat16"
    big_w, mid_w, long_w = (256, 512, 1024) if smoke else (8192, 32768, 131072)
    base = BenchConfig(model=model, dtype=dtype, rounds=1 if smoke else 3, baseline=False)
    cfgs = []
    for mode in ("causal", "document"):
        for window, n in ((big_w, 8), (mid_w, 2)):
            for k in (16, 64, 256):
                cfgs.append(replace(base, mode=mode, window=window, windows=n, k=k,
                                    baseline=(k == 64)))
    cfgs.append(replace(base, mode="causal", window=long_w, windows=1, k=64, baseline=False))
    vllm_targets = run_series(model, cfgs, "tiny" if smoke else "gpu-1b")
    # hf runs each document as its own forward: causal windows only (the per-document
    # forwards of document mode would take minutes of device time for no new information)
    hf_cfgs = [replace(c, engine="hf", baseline=False) for c in cfgs
               if c.k == 64 and c.window <= mid_w and c.mode == "causal"]
    hf_targets = run_series(model, hf_cfgs, "tiny" if smoke else "gpu-1b")
    captured = {**vllm_targets, **hf_targets}
    for rec in agreement(captured, "hf", "pooler") + agreement(captured, "prompt-logprobs",
                                                               "pooler"):
        emit(rec)


def engine_only() -> None:
    """gpu-1b: the pooler engine's targets alone (no writer) per config, and the pooler's
    top-64 ids against the hf engine's top-80 (robust to near-ties at the boundary)."""
    from kdcache.teacher_dump import bench as b

    cfgs = [b.BenchConfig(model=GPU_1B, dtype="bfloat16", mode=m, window=w, windows=n, k=k)
            for m, w, n, k in [("causal", 8192, 8, 16), ("causal", 8192, 8, 64),
                               ("causal", 8192, 8, 256), ("causal", 32768, 2, 16),
                               ("causal", 32768, 2, 64), ("causal", 32768, 2, 256),
                               ("document", 8192, 8, 64), ("document", 32768, 2, 256),
                               ("causal", 131072, 1, 64)]]
    wins = [b.bench_windows(c) for c in cfgs]
    engine, start_s = b._engine("vllm", cfgs)
    try:
        for c, w in zip(cfgs, wins):
            engine.reconfigure(k=c.k, mode=c.mode, window=c.window)
            sec = b._median_seconds(lambda: engine.topk(w), c.rounds)
            tokens = int(sum(x.n_tokens for x in w))
            emit({"step": "engine_only", "teacher": "gpu-1b", "mode": c.mode, "k": c.k,
                  "window": c.window, "tokens": tokens,
                  "engine_tokens_per_s": round(tokens / sec, 1),
                  "engine_start_s": round(start_s, 1)})
        engine.reconfigure(k=64, mode="causal", window=8192)
        mine = engine.topk(wins[1])
    finally:
        engine.close()
    hf, _ = b._engine("hf", [cfgs[1]])
    try:
        hf.reconfigure(k=80, mode="causal", window=8192)
        ref = hf.topk(wins[1])
    finally:
        hf.close()
    import numpy as np

    inside, top1 = [], []
    for a, r in zip(mine, ref):
        v = a.valid
        for ids, rids in zip(a.ids[v], r.ids[v]):
            inside.append(np.isin(ids, rids).mean())
        top1.append(a.ids[v][:, 0] == r.ids[v][:, 0])
    emit({"step": "agreement_topk_in_ref80", "teacher": "gpu-1b", "k": 64, "window": 8192,
          "rows": len(inside), "mean_share_in_hf_top80": round(float(np.mean(inside)), 5),
          "rows_all_in_hf_top80": round(float(np.mean(np.array(inside) == 1.0)), 5),
          "top1_equal": round(float(np.concatenate(top1).mean()), 5)})


def writer(smoke: bool = False) -> None:
    """The whole dump (engine + conversion + validation + qrank encoding + shard writes) over the
    ceiling at k = 16, 64, 256, 16 windows of 8k and 8 of 32k (shards of 16 windows, the dump's
    default), causal and document (one series, median of 2 after a 2-window warm-up, its JSON
    lines written when it ends); no baseline, no hf (the writer is what these cells measure); the
    writer encodes on worker processes (the dump's default: the CPUs, up to 16). The last
    window's encoding, after the engine is done, happens once per real dump: 8-16 windows make
    it a small part (`dump_tail_s`; `dump_engine_side` is the pace without it). Last, causal
    32k k=256 again on 12 workers. Encoding alone on this host first: inline and 16 worker
    processes, k = 256, 32k (k = 64 is 4x faster: BENCHMARKS.md)."""
    import subprocess
    from dataclasses import replace

    from kdcache.teacher_dump.bench import BenchConfig
    from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher

    model = TINY if smoke else GPU_1B
    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(model, "config.json")):
        preset = TeacherConfig.preset("tiny", max_positions=2048) if smoke \
            else TeacherConfig.preset("gpu-1b")
        build_teacher(model, preset, log=lambda m: None)
    emit({"step": "teacher", "name": "tiny" if smoke else "gpu-1b",
          "seconds": round(time.perf_counter() - t0, 1)})
    # WRITER_CELLS=mode:window:k,... runs only those dump cells (no encode-alone, no 12-worker
    # cell): a short device call
    only = [tuple(c.split(":")) for c in os.environ.get("WRITER_CELLS", "").split(",") if c]
    encode = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "bench_encode.py")]
    # worker processes (the dump's path) against threads (the path before), same windows
    for k, window, n in (() if only else ((64, 4096, 2), (256, 4096, 1)) if smoke
                         else ((256, 32768, 2),)):
        proc = subprocess.run(encode + ["--workers", "1,2" if smoke else "1,16",
                                        "--threads", "", "--k", str(k),
                                        "--window", str(window), "--windows", str(n),
                                        "--rounds", "1" if smoke else "2"],
                              capture_output=True, text=True, timeout=300)
        emit({"step": "encode_workers", **json.loads(proc.stdout.strip().splitlines()[-1])}
             if proc.returncode == 0 else {"step": "encode_workers", "error": proc.stderr[-2000:]})
    dtype = "float32" if smoke else "bfloat16"
    # smoke: the 1,024-token windows at k=256 are large enough for the worker processes
    short, long = (512, 1024) if smoke else (8192, 32768)
    feed = os.environ.get("WRITER_FEED", "both")
    if feed not in ("both", "fed", "blocking"):
        raise SystemExit(f"WRITER_FEED={feed!r}: choose both, fed or blocking")
    rounds = int(os.environ.get("WRITER_ROUNDS", "1" if smoke else "2"))
    # smoke: groups of 2-3 windows, as the dump's 16k-token groups of 8k windows on a GPU;
    # else None: the dump's own groups for each cell's k (pipeline.engine_call_tokens)
    env_call = os.environ.get("WRITER_CALL_TOKENS")
    call = int(env_call) if env_call else (1024 if smoke else None)
    caps = {f"feed_max_{what}": int(os.environ[f"WRITER_FEED_MAX_{what.upper()}"])
            for what in ("requests", "tokens") if os.environ.get(f"WRITER_FEED_MAX_{what.upper()}")}
    base = BenchConfig(model=model, dtype=dtype, rounds=rounds, baseline=False,
                       feed=feed != "blocking", compare_blocking=feed == "both",
                       call_tokens=call, **caps)
    # one series (two engine starts, not four: the step has ~6 minutes), causal first
    scale = int(os.environ.get("WRITER_SCALE", "1"))
    counts = tuple(scale * n for n in ((8, 4) if smoke else (16, 8)))
    cfgs = [replace(base, mode=mode, window=window, windows=n, k=k)
            for mode in ("causal", "document") for window, n in zip((short, long), counts)
            for k in (16, 64, 256)]
    # the same cell on fewer workers than cores: does a core left to the engine's thread and
    # the writer's own threads beat a 16th worker?
    heaviest = next(c for c in cfgs if (c.mode, c.window, c.k) == ("causal", long, 256))
    cfgs.append(replace(heaviest, encode_workers=2 if smoke else 12))
    if only:
        # mode:window:k[:call_tokens[:encode_workers]]: a cell once per variant given
        # another window (128k, say): as many windows as the short cells' tokens, at least 2
        by_cell = {(c.mode, str(c.window), str(c.k)): c for c in cfgs[:-1]}

        def cell_config(cell: tuple) -> BenchConfig:
            mode, window, k = cell[0], int(cell[1]), int(cell[2])
            return by_cell.get(cell[:3]) or replace(
                base, mode=mode, window=window, k=k,
                windows=max(2, counts[0] * short // window))

        cfgs = [replace(cell_config(cell),
                        **({"call_tokens": int(cell[3])} if len(cell) > 3 and cell[3] else {}),
                        **({"encode_workers": int(cell[4])} if len(cell) > 4 else {}))
                for cell in only]
    run_series(model, cfgs, "tiny" if smoke else "gpu-1b")
    emit({"step": "writer_done", "seconds": round(time.perf_counter() - t0, 1)})


def big() -> None:
    from kdcache.teacher_dump.bench import BenchConfig

    # BIG_WINDOWS: windows of 32k per measurement (default 2)
    cfg = BenchConfig(model=BIG, dtype="bfloat16", window=32768,
                      windows=int(os.environ.get("BIG_WINDOWS", "2")), k=64, rounds=2,
                      baseline=False, mode="causal")
    run_series(BIG, [cfg], "llama3-8b-shape")


def main() -> None:
    step = sys.argv[1] if len(sys.argv) > 1 else "smoke"
    import torch

    emit({"step": "start", "what": step, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
          "torch": torch.__version__, "vllm": _vllm_version()})
    if step == "teachers":
        build_teachers()
    elif step == "gpu1b":
        gpu1b()
    elif step == "big":
        big()
    elif step == "engine-only":
        engine_only()
    elif step in ("writer", "writer-smoke"):
        writer(smoke=step == "writer-smoke")
    elif step == "smoke":
        from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher

        if not os.path.isfile(os.path.join(TINY, "config.json")):
            build_teacher(TINY, TeacherConfig.preset("tiny", max_positions=2048),
                          log=lambda m: None)
        gpu1b(smoke=True)
    else:
        raise SystemExit(f"unknown step {step!r}")


def _vllm_version() -> str | None:
    try:
        import vllm

        return vllm.__version__
    except Exception as exc:  # reported, not fatal: the hf figures still run
        return f"unavailable: {exc}"


if __name__ == "__main__":
    main()
