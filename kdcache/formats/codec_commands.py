"""`kdcache codec ...`: measuring target codecs (`eval`)."""

from __future__ import annotations

import argparse
import json

# The handlers import what they run inside themselves: `kdcache --help` imports every commands
# module, and pyarrow, numba, torch, vLLM or Ray at module level would make it take seconds.


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "codec", help="measure target codecs (size, KL, decode speed)",
        description="Tools for the codecs that store teacher targets in shards.")
    sub = p.add_subparsers(dest="codec_command", metavar="SUBCOMMAND")
    e = sub.add_parser(
        "eval", help="encode a top-k npz with a codec; report bytes, KL and decode speed",
        description=(
            "Encode the top-k targets of FILE.npz (ids int [N,k], logprobs float32 [N,k] "
            "full-vocabulary log-probs sorted descending per row, vocab_size) with a codec, in "
            "writer-sized windows, with the codec's table fitted on the file's first tokens as a "
            "streaming writer would. Reports bytes per token and per (id, value) entry (table "
            "included), KL(original || decoded) over each token's k ids (both renormalised), "
            "and the one-thread decode rate next to plain zstd of int32 ids + fp16 values."))
    e.add_argument("--topk", required=True, metavar="FILE.npz", help="top-k targets to encode")
    e.add_argument("--codec", default=None,
                   help="codec name (default: the default codec for top-k targets)")
    e.add_argument("--k", type=int, default=None,
                   help="use the first K columns (K <= the file's k; default: all)")
    e.add_argument("--window", type=int, default=8192,
                   help="rows per encoded blob, as the writer would (default 8192)")
    e.add_argument("--table-tokens", type=int, default=8192,
                   help="rows of the file the codec's table is fitted on (0: no table)")
    e.add_argument("--repeats", type=int, default=5, help="timed decode runs (median)")
    e.add_argument("--json", action="store_true", help="print one JSON line")
    e.set_defaults(handler=_run_eval)
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])


def _run_eval(args: argparse.Namespace) -> int:
    from kdcache.formats.codec_eval import TopkFileError, evaluate, format_table, load_topk_npz
    from kdcache.formats.codecs import default_codec

    if args.window <= 0 or args.repeats <= 0 or args.table_tokens < 0:
        raise TopkFileError(f"{args.topk}: --window and --repeats must be positive, "
                            "--table-tokens non-negative")
    topk = load_topk_npz(args.topk, k=args.k)
    result = evaluate(topk, args.codec or default_codec("topk"), window=args.window,
                      table_tokens=args.table_tokens, repeats=args.repeats)
    print(json.dumps(result) if args.json else format_table(result))
    return 0
