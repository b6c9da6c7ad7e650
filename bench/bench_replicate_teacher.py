"""Train a replicate preset's retrieval teacher alone and measure its passkey accuracy by needle
distance with the evaluation's own needle test (kdcache.replicate.evaluation.needle_record).

    python3 bench/bench_replicate_teacher.py --preset toy --seconds 450        # one H200
    python3 bench/bench_replicate_teacher.py --preset smoke --seconds 30 --lengths 256,512

Prints one JSON line (and writes it to $OUT/replicate_teacher.json): the teacher's record
(steps, the passkey ladder it climbed, last losses) and accuracy overall, by prompt length and by
needle-distance bin. The teacher is written under $OUT/../ (not carried back: only the JSON is).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdcache.replicate.corpus import document_mix  # noqa: E402
from kdcache.replicate.evaluation import needle_config, needle_record  # noqa: E402
from kdcache.replicate.presets import get_preset  # noqa: E402
from kdcache.replicate.teacher import train_retrieval_teacher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--seconds", type=float, default=None, help="default: the preset's")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--context", type=int, default=None, help="default: the preset's")
    ap.add_argument("--tokens-per-step", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,24576")
    ap.add_argument("--samples", type=int, default=None, help="per (length, depth)")
    ap.add_argument("--device", default=None, help="cuda or cpu; default: the preset's")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16; default: the preset's")
    args = ap.parse_args()
    preset = get_preset(args.preset, **{k: v for k, v in (("device", args.device),
                                                          ("dtype", args.dtype)) if v})
    out = os.environ.get("OUT", "out")
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="kdcache-teacher-")
    started = time.perf_counter()
    record = train_retrieval_teacher(
        os.path.join(work, "teacher"), preset.teacher_model,
        context=args.context or preset.teacher_context,
        seconds=args.seconds if args.seconds is not None else preset.teacher_seconds,
        device=preset.device, tokens_per_step=args.tokens_per_step
        or preset.teacher_tokens_per_step, lr=args.lr or preset.teacher_lr,
        max_steps=args.max_steps, documents=document_mix(preset),
        log=lambda m: print(m, file=sys.stderr, flush=True))
    trained = time.perf_counter() - started
    config = needle_config(preset)
    config["lengths"] = [int(n) for n in args.lengths.split(",")]
    if args.samples:
        config["samples"] = args.samples
    needle = needle_record(record["out"], config)
    by_length = defaultdict(list)
    for s in needle["samples"]:
        by_length[s["length"]].append(s["score"])
    result = {"bench": "replicate_teacher", "preset": preset.name, "device": preset.device,
              "train_wall_s": round(trained, 1),
              "eval_wall_s": round(time.perf_counter() - started - trained, 1),
              "accuracy": needle["accuracy"],
              "by_length": {str(n): sum(v) / len(v) for n, v in sorted(by_length.items())},
              "by_distance": needle["by_distance"], "needle_config": config, "teacher": record}
    with open(os.path.join(out, "replicate_teacher.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps({k: result[k] for k in ("bench", "preset", "train_wall_s", "eval_wall_s",
                                             "accuracy", "by_length")}
                     | {"steps": record["steps"],
                        "longest_open": (record["passkey"] or {}).get("longest_open")}))


if __name__ == "__main__":
    main()
