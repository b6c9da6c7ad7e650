"""CLI: `kdcache subset`, `kdcache merge`, `kdcache reshard`, `kdcache reencode`."""

from __future__ import annotations

import argparse
import json

_AFTER = ("The output is a new dataset (shards atomic, manifest last), verified before the "
          "command returns; its manifest's extra.lineage and its card record the sources "
          "(path, manifest hash) and the operation.")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "subset", help="keep some windows of a dataset (ranges, or those holding documents)",
        description="Copy the windows selected by --windows (manifest order, e.g. 0:100,250) "
                    "and/or those holding any document of --documents (document ids, same "
                    "syntax) into a new dataset. Windows are kept whole, so every target stays "
                    "the teacher's own; targets are copied bit for bit. " + _AFTER)
    p.add_argument("path", help="source dataset (directory or URL)")
    p.add_argument("--out", required=True, help="new dataset directory or URL")
    p.add_argument("--windows", help="window ranges A:B (half-open), N, comma-separated")
    p.add_argument("--documents", help="document id ranges, as --windows")
    _common(p, _run_subset)

    p = subparsers.add_parser(
        "merge", help="concatenate datasets of the same teacher and packing",
        description="Concatenate datasets in the order given. Refused unless they share the "
                    "teacher (all but its path), the targets (kind, k, vocabulary, temperature) "
                    "and the packing (all but seed and shard size). Targets of datasets coded "
                    "alike are copied bit for bit; others are encoded again with the first "
                    "dataset's codec. " + _AFTER)
    p.add_argument("paths", nargs="+", help="datasets to merge (two or more)")
    p.add_argument("--out", required=True)
    _common(p, _run_merge)

    p = subparsers.add_parser(
        "reshard", help="the same windows in shards of another size",
        description="Rewrite a dataset with --windows-per-shard windows per shard (targets copied "
                    "bit for bit). " + _AFTER)
    p.add_argument("path")
    p.add_argument("--out", required=True)
    p.add_argument("--windows-per-shard", type=int, required=True)
    p.add_argument("--json", action="store_true", help="print one JSON line (no progress bar)")
    p.set_defaults(handler=_run_reshard)

    p = subparsers.add_parser(
        "reencode", help="encode the targets with another codec, or keep a smaller k",
        description="Decode every window and encode it again: with --codec (raw, qrank), and/or "
                    "keeping the --k largest entries of top-k targets (k at most the source's). "
                    "Prints how far the new targets are from the source's (max |log-prob| "
                    "change, mean KL of the kept entries). " + _AFTER)
    p.add_argument("path")
    p.add_argument("--out", required=True)
    p.add_argument("--codec", help="target codec (default: the source's)")
    p.add_argument("--k", type=int, help="keep this many top-k entries per row")
    p.add_argument("--codec-param", action="append", default=[], metavar="KEY=JSON",
                   help="codec parameter, e.g. kl_target=0.001 (repeatable)")
    _common(p, _run_reencode)


def _common(p: argparse.ArgumentParser, handler) -> None:
    p.add_argument("--windows-per-shard", type=int, default=None,
                   help="windows per output shard (default: the sources' median)")
    p.add_argument("--json", action="store_true", help="print one JSON line (no progress bar)")
    p.set_defaults(handler=handler)


def _print(result, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result.as_dict()))
        return 0
    print(f"kdcache {result.operation}: {result.out}: {result.windows:,} windows, "
          f"{result.tokens:,} tokens, {result.shards} shards; targets {result.targets}; "
          "verified OK")
    change = result.stats.get("change")
    if change:
        print(f"  change from the source: max |log-prob| {change['max_abs_logprob_change']:.4g}, "
              f"mean KL {change['mean_kl_renormalised']:.3g} nats over "
              f"{change['rows_compared']:,} rows")
    return 0


def _run_subset(args: argparse.Namespace) -> int:
    from kdcache.formats.ops import subset

    return _print(subset(args.path, args.out, windows=args.windows, documents=args.documents,
                         windows_per_shard=args.windows_per_shard, progress=not args.json),
                  args.json)


def _run_merge(args: argparse.Namespace) -> int:
    from kdcache.formats.ops import merge

    return _print(merge(args.paths, args.out, windows_per_shard=args.windows_per_shard,
                        progress=not args.json), args.json)


def _run_reshard(args: argparse.Namespace) -> int:
    from kdcache.formats.ops import reshard

    return _print(reshard(args.path, args.out, windows_per_shard=args.windows_per_shard,
                          progress=not args.json), args.json)


def _run_reencode(args: argparse.Namespace) -> int:
    from kdcache.formats.ops import OperationError, reencode

    params = {}
    for item in args.codec_param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OperationError(f"--codec-param {item!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            raise OperationError(f"--codec-param {item!r}: the value must be JSON "
                                 "(a number, true/false, null or a quoted string)") from None
    return _print(reencode(args.path, args.out, codec=args.codec, k=args.k,
                           codec_params=params or None,
                           windows_per_shard=args.windows_per_shard, progress=not args.json),
                  args.json)
