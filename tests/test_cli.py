"""The console script: every subcommand explains itself; verify/inspect speak JSON and exit codes."""

import argparse
import json
import subprocess
import sys

import pytest

from kdcache.cli import build_parser, main
from kdcache.formats.synthetic import write_synthetic_dataset


def _subcommands(parser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_console_script_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "kdcache.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name in ("verify", "inspect", "demo"):
        assert name in out


def test_every_subcommand_has_help(capsys):
    for name, sub in _subcommands(build_parser()).items():
        assert sub.description, f"`kdcache {name}` has no description"
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: kdcache" in capsys.readouterr().out


def test_verify_and_inspect_cli(tmp_path, capsys):
    root = tmp_path / "ds"
    write_synthetic_dataset(root, windows=3, window=128, vocab_size=3000, k=8,
                            windows_per_shard=2, doc_len=(8, 40))
    assert main(["verify", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["windows_checked"] == 3
    assert main(["inspect", str(root), "--json", "--window", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["windows"] == 3 and summary["k"] == 8 and summary["tokens"] == 384
    assert summary["preview"]["window_index"] == 1
    shard = root / "shards" / "shard-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["verify", str(root)]) == 1
    assert "PROBLEM" in capsys.readouterr().out


def test_user_errors_print_without_traceback(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "manifest.json: missing" in err and "Traceback" not in err
