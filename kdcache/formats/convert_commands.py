"""CLI: `kdcache convert` (DistillKit, Megatron-LM -> kdcache) and `kdcache export` (kdcache ->
Parquet with decoded ids/log-prob columns)."""

from __future__ import annotations

import argparse
import json

from kdcache.errors import KdcacheError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="turn a DistillKit or Megatron-LM logit dataset into a kdcache dataset",
        description="Convert another tool's stored teacher top-k into a kdcache dataset "
                    "(verified, with a card). --from distillkit: a folder of DistillKit Parquet "
                    "files with its compression_config.yaml (decoded as DistillKit decodes "
                    "them); samples become documents packed next-fit into windows, in "
                    "'document' mode. --from megatron: Megatron-LM logits-saver tars "
                    "(cp0_dpD__I.tar) plus --tokens, the samples' token ids in the order "
                    "Megatron's data loader produced them. What is lossy is counted in the "
                    "output's stats and described in docs/convert.md.")
    p.add_argument("source", help="DistillKit folder/file, or Megatron logits directory")
    p.add_argument("--from", dest="source_format", required=True,
                   choices=["distillkit", "megatron"])
    p.add_argument("--out", required=True, help="new kdcache dataset (directory or URL)")
    p.add_argument("--codec", default=None, help="target codec (default: the formats default)")
    p.add_argument("--window", type=int, default=None,
                   help="window size (DistillKit: default the longest sample)")
    p.add_argument("--config", default=None,
                   help="DistillKit compression_config.yaml (default: beside the Parquet files)")
    p.add_argument("--tokens", default=None,
                   help="Megatron: .npy int array [samples, seq_length or seq_length+1]")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="teacher vocabulary (DistillKit default: the config's d; Megatron: "
                        "required)")
    p.add_argument("--teacher-name", default=None, help="teacher name for the manifest/card")
    p.add_argument("--windows-per-shard", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print one JSON line (no progress bar)")
    p.set_defaults(handler=_run_convert)

    p = subparsers.add_parser(
        "export", help="write a kdcache dataset as Parquet with decoded targets",
        description="Write every window as one Parquet row: window_index, tokens, doc_offsets, "
                    "doc_ids, valid, and the decoded targets as list columns ids "
                    "(list<list<int32>>) and logprobs (or weights for sampled targets, "
                    "list<list<float32>>), one inner list per token (empty where a row has no "
                    "target). pandas, polars and Hugging Face datasets read it as is.")
    p.add_argument("path", help="kdcache dataset (directory or URL)")
    p.add_argument("--format", default="parquet", choices=["parquet"])
    p.add_argument("--out", required=True, help="output folder (one Parquet file per shard)")
    p.add_argument("--json", action="store_true", help="print one JSON line (no progress bar)")
    p.set_defaults(handler=_run_export)


def _run_convert(args: argparse.Namespace) -> int:
    if args.source_format == "distillkit":
        from kdcache.formats.convert.distillkit import convert_distillkit

        summary = convert_distillkit(args.source, args.out, config=args.config,
                                     window=args.window, codec=args.codec,
                                     vocab_size=args.vocab_size,
                                     teacher_name=args.teacher_name or "distillkit",
                                     windows_per_shard=args.windows_per_shard,
                                     progress=not args.json)
    else:
        from kdcache.formats.convert.megatron import convert_megatron

        if not args.tokens or not args.vocab_size:
            raise KdcacheError("--from megatron needs --tokens (the samples' token ids) and "
                               "--vocab-size (the teacher's vocabulary): the tars hold neither")
        summary = convert_megatron(args.source, args.out, tokens=args.tokens,
                                   vocab_size=args.vocab_size, codec=args.codec,
                                   teacher_name=args.teacher_name or "megatron",
                                   windows_per_shard=args.windows_per_shard,
                                   progress=not args.json)
    if args.json:
        print(json.dumps(summary))
    else:
        changed = summary["rows_changed"]
        print(f"kdcache convert: {args.out}: {summary['format']} -> kdcache "
              f"({summary['codec']}): {summary['windows']:,} windows, {summary['tokens']:,} "
              f"tokens, {summary['tokens_per_s']:,.0f} tokens/s; verified OK")
        print("  rows changed to be valid targets: " + ", ".join(
            f"{k} {v:,}" for k, v in changed.items() if k != "rows") +
            f" (of {changed['rows']:,})")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from kdcache.formats.export import export_parquet

    summary = export_parquet(args.path, args.out, progress=not args.json)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"kdcache export: {args.out}: {summary['files']} Parquet files, "
              f"{summary['windows']:,} windows, {summary['bytes']:,} bytes")
    return 0
