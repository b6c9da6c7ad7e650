"""`kdcache demo`: the whole product, end to end, on the embedded default.

A tiny teacher built locally (no network), the built-in corpus dumped through vLLM on a local Ray
cluster, the dataset verified and inspected, a tiny student trained from the shards with KD, and
the student evaluated against the teacher's stored targets on the last eighth of the windows,
which training never saw (`--holdout-windows` / `--last-windows`). Then the same for chat data: the
built-in conversations (system prompts, follow-ups, tool calls) rendered with the teacher's chat
template, dumped with targets on the assistant turns only, and a student trained on them. Each
step is the same `kdcache` subcommand a user would run, so the demo doubles as a worked example.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

# The handlers import what they run inside themselves: `kdcache --help` imports every commands
# module, and pyarrow, numba, torch, vLLM or Ray at module level would make it take seconds.


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole pipeline end to end on a tiny built-in teacher and corpus",
        description="Build a tiny teacher, dump its top-k over the built-in corpus with vLLM on a "
                    "local Ray cluster, verify and inspect the dataset, train a tiny student "
                    "from the shards with KD, and evaluate it. Minutes on 2 CPU cores; no network.")
    p.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    p.add_argument("--teacher-seconds", type=int, default=60,
                   help="train the tiny teacher this long so its distributions are peaked")
    p.add_argument("--window", type=int, default=1024, help="tokens per packed window")
    p.add_argument("--k", type=int, default=16, help="teacher top-k")
    p.add_argument("--engine", default="vllm", choices=["vllm", "hf"], help="teacher engine")
    p.add_argument("--config", default="tiny-phasewise-kd",
                   help="student run config (default: tiny-phasewise-kd, the paper's phase-wise "
                        "RoPE schedule at a tiny size)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="override the training steps of every stage")
    p.add_argument("--chat-conversations", type=int, default=160,
                   help="built-in conversations in the chat example (0: skip it)")
    # the commands this build registered: cli registers every component's beside this one
    p.set_defaults(handler=lambda args: _run_demo(args, set(subparsers.choices)))


def _step(name: str, argv: list[str], log: list[dict]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kdcache.cli", *argv]
    print(f"\n=== {name}: kdcache {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, text=True)
    seconds = time.perf_counter() - start
    log.append({"step": name, "command": "kdcache " + shlex.join(argv),
                "seconds": round(seconds, 1), "rc": proc.returncode})
    if proc.returncode != 0:
        raise SystemExit(f"demo step {name!r} failed with exit code {proc.returncode}")
    return proc


def _chat_example(args: argparse.Namespace, out: Path, teacher: Path, log: list[dict]) -> None:
    """Response-only targets: a chat corpus dumped with targets on the assistant turns, and a
    short KD run on it (the prompt rows carry no target, so neither loss term sees them)."""
    data, student = out / "chat-dataset", out / "chat-student"
    if not (data / "manifest.json").exists():
        _step("chat-dump", ["dump", "--model", str(teacher), "--corpus", "builtin-chat",
                            "--builtin-documents", str(args.chat_conversations),
                            "--targets", "assistant", "--out", str(data),
                            "--window", str(args.window), "--k", str(args.k),
                            "--engine", args.engine, "--workers", "1"], log)
    _step("chat-inspect", ["inspect", str(data)], log)
    steps = str(args.max_steps or 40)
    _step("chat-train", ["train", "--config", "tiny-fixed10k-kd", "--data", str(data),
                         "--out", str(student), "--max-steps", steps], log)
    exports = sorted(student.glob("*/hf/config.json"))
    if exports:
        _step("chat-eval", ["eval", "lm", str(exports[-1].parent), str(teacher), "--data",
                            str(data), "--out", str(out / "chat-eval")], log)


def _run_demo(args: argparse.Namespace, have: set[str]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, data, student = out / "teacher", out / "dataset", out / "student"
    log: list[dict] = []
    skipped: list[str] = []

    if "make-teacher" in have:
        if not (teacher / "config.json").exists():
            _step("teacher", ["make-teacher", "--out", str(teacher), "--preset", "demo",
                              "--train-seconds", str(args.teacher_seconds)], log)
    else:
        skipped.append("make-teacher (teacher dump not built yet)")
    if "dump" in have and (teacher / "config.json").exists():
        if not (data / "manifest.json").exists():
            _step("dump", ["dump", "--model", str(teacher), "--corpus", "builtin",
                           "--out", str(data), "--window", str(args.window), "--k", str(args.k),
                           "--engine", args.engine, "--workers", "1"], log)
    else:
        skipped.append("dump")
    if not (data / "manifest.json").exists():
        # Without a teacher dump, show the format on a synthetic dataset instead.
        from kdcache.formats.synthetic import write_synthetic_dataset

        print("\n=== dataset: no teacher dump available; writing a synthetic dataset", flush=True)
        write_synthetic_dataset(data, windows=8, window=args.window, vocab_size=4096, k=args.k)
    _step("verify", ["verify", str(data)], log)
    _step("inspect", ["inspect", str(data), "--window", "0", "--rows", "3"], log)
    # Keep the last eighth of the windows out of training, and evaluate on them.
    from kdcache.formats.reader import open_dataset

    n_windows = len(open_dataset(str(data)))
    holdout = max(1, n_windows // 8) if n_windows >= 4 else 0
    final_student = None
    if "train" in have:
        argv = ["train", "--config", args.config, "--data", str(data), "--out", str(student),
                "--holdout-windows", str(holdout)]
        if args.max_steps:
            argv += ["--max-steps", str(args.max_steps)]
        _step("train", argv, log)
        exports = sorted(student.glob("*/hf/config.json"))
        final_student = exports[-1].parent if exports else None
    else:
        skipped.append("train")
    if "eval" in have and final_student is not None:
        models = [str(final_student)] + ([str(teacher)] if (teacher / "config.json").exists() else [])
        held = ["--last-windows", str(holdout)] if holdout else []
        _step("eval", ["eval", "lm", *models, "--data", str(data), "--out", str(out / "eval"), *held], log)
    else:
        skipped.append("eval")

    if args.chat_conversations and "train" in have and (teacher / "config.json").exists():
        _chat_example(args, out, teacher, log)

    summary = {"out": str(out), "steps": log, "skipped": skipped}
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    print("\n=== demo summary")
    for s in log:
        print(f"  {s['step']:<8} {s['seconds']:>7.1f} s   {s['command']}")
    for s in skipped:
        print(f"  skipped: {s}")
    print(f"  outputs under {out}/ (summary: {out / 'demo-summary.json'})")
    return 0
