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


class _ShowDefaults(argparse.HelpFormatter):
    """Appends "(default: X)" to every option whose help does not already name its default;
    required options, flags and options without a default (None) have none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if ("default" in help_text.lower() or action.required or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):
            return help_text
        return f"{help_text} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    """Every kdcache parser shows its options' defaults in --help, whatever formatter its command
    asks for (one place, so a new command cannot forget)."""

    def __init__(self, *args, formatter_class=argparse.HelpFormatter, **kwargs) -> None:
        if not issubclass(formatter_class, _ShowDefaults):
            formatter_class = type(f"ShowDefaults{formatter_class.__name__}",
                                   (_ShowDefaults, formatter_class), {})
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        self.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="show Ray's, vLLM's and Lightning's own log messages and warnings")

    def _add_action(self, action: argparse.Action) -> argparse.Action:
        if not action.help and action.option_strings and action.default not in (
                None, False, argparse.SUPPRESS):
            action.help = "(default: %(default)s)"  # argparse shows nothing without a help line
        return super()._add_action(action)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kdcache",
        description=(
            "Offline logit knowledge distillation: run a teacher once, store its top-k "
            "next-token distributions as compressed Arrow shards, train students from them."
        ),
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
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


QUIET_ENV = "KDCACHE_QUIET_LIBRARIES"


def quiet_libraries() -> None:
    """Keep Ray's, vLLM's and Lightning's info messages and deprecation warnings off stderr
    (kdcache prints its own progress and summary). Set before they are imported, so that the
    Ray and vLLM processes started later inherit it; a user's own setting wins."""
    import logging
    import os
    import warnings

    os.environ[QUIET_ENV] = "1"  # kdcache's own worker processes quiet themselves too
    os.environ.setdefault("RAY_LOGGER_LEVEL", "error")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("lightning.pytorch", "lightning.fabric", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0 if args.command is None else 2
    if not getattr(args, "verbose", False):
        quiet_libraries()
    # Progress lines of long jobs reach a pipe or a log file as they happen, not at exit.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and not stream.isatty():
            stream.reconfigure(line_buffering=True)
    try:
        result = args.handler(args)
    except KdcacheError as exc:
        print(f"kdcache {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # resumable work says so itself; a traceback helps nobody here
        print(f"kdcache {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
