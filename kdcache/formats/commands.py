"""CLI: `kdcache verify` and `kdcache inspect`."""

from __future__ import annotations

import argparse
import json

# The handlers import what they run inside themselves: `kdcache --help` imports every commands
# module, and pyarrow, numba, torch, vLLM or Ray at module level would make it take seconds.


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify", help="check a logit dataset is complete and intact",
        description="Check a kdcache dataset: manifest (format, version, fields), codec table, "
                    "every shard (present, size, Arrow magic, xxh3 hash, schema) and every window "
                    "(tokens, document offsets, valid flags, decoded targets). Exit code 0 when "
                    "clean, 1 when problems were found.")
    p.add_argument("path", help="dataset directory or fsspec URL")
    p.add_argument("--quick", action="store_true",
                   help="check sizes, hashes and structure without decoding every window")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(handler=_run_verify)

    p = subparsers.add_parser(
        "inspect", help="summarise a logit dataset (tokens, windows, k, bytes/token, teacher)",
        description="Print what a kdcache dataset holds: teacher, target kind and k, packing "
                    "mode and window, tokens, windows, shards, bytes per token. With --window, "
                    "also the first rows of one window with their top targets.")
    p.add_argument("path", help="dataset directory or fsspec URL")
    p.add_argument("--window", type=int, default=None, help="preview this window")
    p.add_argument("--rows", type=int, default=4, help="rows to preview (with --window)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(handler=_run_inspect)


def _run_verify(args: argparse.Namespace) -> int:
    from kdcache.formats.verify import verify_dataset

    report = verify_dataset(args.path, decode=not args.quick, progress=not args.json)
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        for w in report.warnings:
            print(f"warning: {w}")
        for p in report.problems:
            print(f"PROBLEM: {p}")
        status = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
        print(f"verify {args.path}: {status}: {report.shards_checked} shards, "
              f"{report.windows_checked} windows, {report.tokens_checked:,} tokens checked")
    return 0 if report.ok else 1


def _run_inspect(args: argparse.Namespace) -> int:
    from kdcache.formats.inspect import format_summary, summarize, window_preview
    from kdcache.formats.reader import open_dataset

    ds = open_dataset(args.path)
    summary = summarize(ds)
    if args.window is not None:
        summary["preview"] = window_preview(ds, args.window, rows=args.rows)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(format_summary(summary))
    if args.window is not None:
        pv = summary["preview"]
        print(f"\nwindow {pv['window']} ({pv['tokens']} tokens, {pv['documents']} documents, "
              f"{pv['valid_rows']} rows with targets)")
        for r in pv["rows"]:
            pairs = ", ".join(f"{i}:{p:.3f}" for i, p in zip(r["top_ids"], r["top_probs"]))
            print(f"  row {r['row']:>6} token {r['token']:>7} -> next {r['next_token']}: {pairs}")
    return 0
