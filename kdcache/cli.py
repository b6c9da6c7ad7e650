"""The `kdcache` command line.

Each component registers its own subcommands in `<component>/commands.py` through a
`register(subparsers)` function. Those modules import only argparse at module level, so that
`kdcache --help` stays fast; heavy imports (torch, vLLM, Ray) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kdcache import __version__
from kdcache.errors import KdcacheError

# Order here is the order in `kdcache --help`.
_COMMAND_MODULES = (
    "kdcache.teacher_dump.commands",
    "kdcache.formats.commands",
    "kdcache.formats.codec_commands",
    "kdcache.formats.ops_commands",
    "kdcache.formats.convert_commands",
    "kdcache.student_train.commands",
    "kdcache.evaluate.eval_commands",
    "kdcache.evaluate.analysis_commands",
    "kdcache.replicate.commands",
    "kdcache.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdcache",
        description=(
            "Offline logit knowledge distillation: run a teacher once, store its top-k "
            "next-token distributions as compressed Arrow shards, train students from them."
        ),
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a component not present in this build
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            continue
        module.register(subparsers)
    return parser


def _version() -> str:
    return f"kdcache {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        result = args.handler(args)
    except KdcacheError as exc:
        print(f"kdcache {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
