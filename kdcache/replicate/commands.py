"""CLI: `kdcache replicate`."""

from __future__ import annotations

import argparse
import json

from kdcache.replicate.presets import get_preset


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replicate", help="the seed paper's experiment at toy scale, end to end, with a report",
        description="Train a teacher that retrieves at distance (and a short-context one), dump "
                    "its targets for short documents packed into long windows (document mask, "
                    "global positions), train KD and CE students under phase-wise and fixed "
                    "RoPE theta (several seeds) plus the causal-test arms, evaluate passkey "
                    "retrieval by distance with 95% intervals, the probe and the checkpoint "
                    "diff, and write DIR/report.md, report.json and PNGs. Resumable: finished "
                    "steps under DIR are kept.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="smoke", choices=["smoke", "toy"],
                   help="smoke: minutes on 2 CPU cores (the pipeline, not the science); "
                        "toy: a 16k-retrieving teacher, one H200")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--teacher", default=None,
                   help="use this HF teacher directory instead of training one")
    p.add_argument("--corpus", default=None,
                   help="JSONL of short documents (field 'text') instead of the built-in ones")
    p.add_argument("--seeds", type=int, default=None, help="override the preset's seeds per arm")
    p.add_argument("--parallel", type=int, default=None,
                   help="override the preset's independent steps run at once (own processes)")
    p.add_argument("--json", action="store_true", help="print the findings as one JSON line")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from kdcache.replicate.pipeline import run_replicate

    overrides = {k: v for k, v in (("seeds", args.seeds), ("parallel", args.parallel))
                 if v is not None}
    preset = get_preset(args.preset, **overrides)
    report = run_replicate(args.out, preset, teacher_dir=args.teacher, corpus=args.corpus,
                           log=(lambda m: None) if args.json else print)
    if args.json:
        print(json.dumps(report["findings"], default=str))
    else:
        print(f"kdcache replicate: report in {args.out}/report.md")
    return 0
