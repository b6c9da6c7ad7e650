"""`kdcache generate` throughput beside vLLM's own offline generation of the same prompts.

One vLLM engine in this process (no Ray: the path GPU figures are measured on). Per round, in
alternating order:
- kdcache: `GenerateWorker.run_part` on every prompt (per-prompt seeded sampling, the response
  records built and the part's JSONL written atomically); prompt rendering, done once per run,
  is timed on its own (`render_s`; `first_render_s` includes loading the tokenizer);
- vLLM: `LLM.generate` on the same prompt token ids with the same per-prompt `SamplingParams`
  (temperature, top-p, max tokens, seed), outputs discarded: the same tokens are sampled, so
  the difference is kdcache's own work (rendering, records, the atomic write).
Prints one JSON line with response tokens/s of each (medians over rounds) and their ratio.

    python bench/bench_generate.py [--model DIR] [--prompts 64] [--max-tokens 64] [--rounds 3]
        [--dtype bfloat16]          # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="teacher directory (default: build one)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    from kdcache.teacher_dump.generate import GenerateConfig, GenerateWorker, render_prompts

    root = tempfile.mkdtemp(prefix="kdcache-bench-generate-")
    model = args.model
    if model is None:
        from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher

        model = os.path.join(root, "teacher")
        build_teacher(model, TeacherConfig.preset("demo", train_seconds=20), log=lambda m: None)
    cfg = GenerateConfig(model=model, prompts="builtin-chat", out=os.path.join(root, "o.jsonl"),
                         builtin_documents=args.prompts, max_tokens=args.max_tokens,
                         max_model_len=2048, dtype=args.dtype, progress=False)
    stats = {"rejected": 0, "too_long": 0, "replaced_responses": 0, "problems": []}
    t0 = time.perf_counter()
    prompts = render_prompts(cfg, stats)  # the first call pays transformers' import and load
    first_render_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    prompts = render_prompts(cfg, dict(stats, problems=[]))
    render_s = time.perf_counter() - t0  # rendering alone: once per run, not per round
    worker = GenerateWorker(model, args.dtype, cfg.max_model_len, cfg.seed, cfg.kv_cache_gib)
    params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
              "seed": cfg.seed}
    from vllm import SamplingParams

    plain = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                            max_tokens=cfg.max_tokens, seed=cfg.seed + p["index"])
             for p in prompts]
    token_prompts = [{"prompt_token_ids": p["prompt_ids"]} for p in prompts]
    worker.llm.generate(token_prompts[:4], plain[:4], use_tqdm=False)  # warm-up
    ours, theirs = [], []
    for r in range(args.rounds):
        for which in (("ours", "vllm") if r % 2 == 0 else ("vllm", "ours")):
            start = time.perf_counter()
            if which == "ours":
                n = worker.run_part(root, f"part-{r:05d}", prompts, params)["tokens"]
                ours.append(n / (time.perf_counter() - start))
            else:
                out = worker.llm.generate(token_prompts, plain, use_tqdm=False)
                n = sum(len(o.outputs[0].token_ids) for o in out)
                theirs.append(n / (time.perf_counter() - start))
    worker.close()
    a, b = statistics.median(ours), statistics.median(theirs)
    print(json.dumps({"bench": "generate", "prompts": len(prompts), "max_tokens": args.max_tokens,
                      "dtype": args.dtype, "rounds": args.rounds,
                      "kdcache_tokens_per_s": round(a, 1), "vllm_tokens_per_s": round(b, 1),
                      "ratio": round(a / b, 3), "render_s": round(render_s, 3),
                      "first_render_s": round(first_render_s, 3)}))


if __name__ == "__main__":
    main()
