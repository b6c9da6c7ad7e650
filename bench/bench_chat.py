"""Bytes per conversation token: all-token targets against response-only targets.

Builds a small teacher locally (no network), dumps the built-in chat corpus (conversations with
system prompts, follow-up questions and tool calls, rendered by the teacher's chat template) three
times with the same windows, `--targets all`, `assistant` and `last-assistant`, with the default
codec and the hf engine on one Ray actor, and prints one JSON line:

    {"bench": "chat_targets", "all": {...}, "assistant": {...}, "last-assistant": {...},
     "assistant_vs_all_bytes": 0.2, "prompt_share": 0.8, ...}

Each entry: conversation tokens, target rows, dataset bytes per conversation token and target
bytes per conversation token. Usage: `python bench/bench_chat.py [--conversations 200]
[--train-seconds 30] [--k 64]`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--train-seconds", type=float, default=30.0)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--window", type=int, default=2048)
    args = ap.parse_args()

    from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher
    from kdcache.teacher_dump.plan import DumpConfig
    from kdcache.teacher_dump.runner import run_dump

    root = tempfile.mkdtemp(prefix="kdcache-bench-chat-")
    teacher = os.path.join(root, "teacher")
    build_teacher(teacher, TeacherConfig.preset("demo", train_seconds=args.train_seconds),
                  log=lambda m: None)
    result: dict = {"bench": "chat_targets", "conversations": args.conversations, "k": args.k,
                    "window": args.window, "teacher": "demo preset",
                    "train_seconds": args.train_seconds}
    for targets in ("all", "assistant", "last-assistant"):
        out = os.path.join(root, targets)
        cfg = DumpConfig.from_options(
            model=teacher, corpus="builtin-chat", builtin_documents=args.conversations, out=out,
            k=args.k, window=args.window, mode="document", engine="hf", device="cpu",
            targets=targets, workers=1, progress=False)
        summary = run_dump(cfg, log=lambda m: None)
        with open(os.path.join(out, "manifest.json")) as fh:
            manifest = json.load(fh)
        totals = manifest["totals"]
        tokens = totals["tokens"]
        result[targets] = {"tokens": tokens, "valid_rows": totals["valid_rows"],
                           "bytes_per_token": round(totals["bytes"] / tokens, 3),
                           "target_bytes_per_token": round(totals["target_bytes"] / tokens, 3),
                           "dump_tokens_per_s": round(summary["tokens_per_s"], 1)}
    a, r = result["all"], result["assistant"]
    result["prompt_share"] = round(1 - r["valid_rows"] / a["valid_rows"], 3)
    result["assistant_vs_all_bytes"] = round(r["bytes_per_token"] / a["bytes_per_token"], 3)
    result["assistant_vs_all_target_bytes"] = round(
        r["target_bytes_per_token"] / a["target_bytes_per_token"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
