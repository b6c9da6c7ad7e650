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


@pytest.mark.parametrize("extra, message", [
    (["--k", "0"], "--k must be at least 1"),
    (["--k", "-3"], "--k must be at least 1"),
    (["--k", "5000"], "--k 5000 exceeds the teacher's vocabulary (1024 ids"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--no-ray", "--workers", "2"], "--no-ray runs one engine in this process"),
    (["--window", "2"], "window must be at least 4"),
    (["--window", "131073"], "--window 131073 exceeds the teacher's 131072 positions "
                             "(max_position_embeddings"),
])
def test_dump_arguments_are_refused_before_anything_is_written(tmp_path, teacher_dir, capsys,
                                                               extra, message):
    out = tmp_path / "o"
    rc = main(["dump", "--model", teacher_dir, "--corpus", "builtin", "--out", str(out),
               "--engine", "hf", "--json", *extra])
    assert rc == 2 and message in capsys.readouterr().err
    assert not out.exists()  # no plan.json poisoning the corrected command


@pytest.mark.slow
def test_ray_and_library_messages_only_with_verbose(tmp_path, teacher_dir):
    import os
    import subprocess
    import sys

    def dump(out, *extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VLLM_"))}
        return subprocess.run(
            [sys.executable, "-m", "kdcache.cli", "dump", "--model", teacher_dir, "--corpus",
             "builtin", "--builtin-documents", "4", "--out", str(tmp_path / out), "--engine",
             "hf", "--k", "4", "--window", "256", "--json", *extra],
            capture_output=True, text=True, env=env, timeout=600)

    quiet = dump("quiet")
    assert quiet.returncode == 0 and quiet.stderr.strip() == "", quiet.stderr
    json.loads(quiet.stdout)
    loud = dump("loud", "--verbose")
    assert loud.returncode == 0 and "Started a local Ray instance" in loud.stderr


def test_dump_gpu_sharing_is_refused_unless_it_fits(tmp_path, teacher_dir, capsys):
    """Engines share a GPU only when asked (--engines-per-gpu), and only with a memory share
    that lets them fit; refused before anything is written."""
    base = ["dump", "--model", teacher_dir, "--corpus", "builtin", "--out", str(tmp_path / "o"),
            "--json", "--engines-per-gpu", "2"]
    assert main(base) == 2
    assert "--gpu-memory-utilization 0.50 or less" in capsys.readouterr().err
    assert main(base + ["--gpu-memory-utilization", "0.45", "--tensor-parallel", "2"]) == 2
    assert "cannot be combined with --tensor-parallel" in capsys.readouterr().err
    assert main(base[:-2] + ["--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert main(base + ["--gpu-memory-utilization", "0.45", "--no-ray"]) == 2
    assert "--engines-per-gpu 2" in capsys.readouterr().err
    assert main(base[:-1] + ["0"]) == 2
    assert "--engines-per-gpu must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
