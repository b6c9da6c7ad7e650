"""Mutated shard bytes give clean errors: no crash, hang or runaway memory (fuzz_shards.py)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _limits():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a runaway allocation fails


def test_mutated_shards_fail_cleanly():
    out = subprocess.run([sys.executable, "-m", "tests.formats.fuzz_shards", "60"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, preexec_fn=_limits,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "fuzz ok" in out.stdout
