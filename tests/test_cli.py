"""The console script: every subcommand explains itself; verify/inspect speak JSON and exit codes."""

import argparse
import json
import os
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


def _all_parsers(parser, prefix="kdcache"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{prefix} {name}")


def test_every_option_shows_its_default():
    missing = []
    for name, parser in _all_parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if (not action.option_strings or action.required or action.help == argparse.SUPPRESS
                    or action.default in (None, False, argparse.SUPPRESS)):
                continue
            text = formatter._expand_help(action) if action.help else ""
            if "default" not in text.lower():
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, f"options whose --help hides the default: {missing}"


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_make_teacher_writes_valid_json_without_training(tmp_path, capsys):
    assert main(["make-teacher", "--out", str(tmp_path / "t"), "--json"]) == 0
    summary = _strict_json(capsys.readouterr().out)
    assert summary["final_loss"] is None and summary["train_steps"] == 0
    _strict_json((tmp_path / "t" / "kdcache_teacher.json").read_text())


def test_ctrl_c_prints_one_line_not_a_traceback(tmp_path):
    import signal

    # A child inherits an ignored SIGINT (Python then installs no KeyboardInterrupt handler),
    # and a library in this process may have left it ignored: spawn with Python's own handler
    # in place (a handled signal is reset to the default at exec). Not unbuffered: the CLI
    # line-buffers a piped stdout, so the step line arrives while the child trains (with block
    # buffering it would come at exit, after 120 s, and the signal would find no process).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli", "make-teacher", "--out",
                                 str(tmp_path / "t"), "--train-seconds", "120"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={k: v for k, v in os.environ.items()
                                     if k != "PYTHONUNBUFFERED"})
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        for line in proc.stdout:  # wait until the handler is busy training
            if "make-teacher: step" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip().endswith("kdcache make-teacher: interrupted")
