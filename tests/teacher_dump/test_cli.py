"""The CLI entry points: help, and clear errors that name the file and the problem."""

from __future__ import annotations

import json

import pytest

from kdcache.cli import main


@pytest.mark.parametrize("argv", [["make-teacher", "--help"], ["dump", "--help"],
                                  ["bench", "dump", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: kdcache" in capsys.readouterr().out


def test_dump_bad_inputs_are_named(tmp_path, teacher_dir, capsys):
    missing = tmp_path / "nope.jsonl"
    rc = main(["dump", "--model", teacher_dir, "--corpus", str(missing), "--out",
               str(tmp_path / "o"), "--engine", "hf", "--json"])
    assert rc == 2 and f"{missing}: corpus not found" in capsys.readouterr().err
    rc = main(["dump", "--model", str(tmp_path / "no-model"), "--corpus", "builtin", "--out",
               str(tmp_path / "o"), "--engine", "hf", "--json"])
    assert rc == 2 and "teacher model directory not found" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    rc = main(["dump", "--model", teacher_dir, "--corpus", str(empty), "--out",
               str(tmp_path / "o2"), "--engine", "hf", "--json"])
    err = capsys.readouterr().err
    assert rc == 2 and "yielded no documents" in err and "1 empty" in err
