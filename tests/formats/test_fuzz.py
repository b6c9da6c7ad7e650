"""Mutated datasets give clean errors: no crash, hang, runaway memory or non-kdcache exception,
and `verify` passes no dataset with an invalid window (fuzz_shards.py; the full 10,000-case run
is `python -m tests.formats.fuzz_shards --cases 10000`, figures in docs/tamper.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mutated_datasets_fail_cleanly(tmp_path):
    figures_path = tmp_path / "figures.json"
    out = subprocess.run([sys.executable, "-m", "tests.formats.fuzz_shards", "--cases", "900",
                          "--workers", "2", "--json", str(figures_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert figures_path.exists(), out.stdout[-3000:] + out.stderr[-3000:]
    figures = json.loads(figures_path.read_text())
    assert figures["cases"] == 900
    for key in ("crashes", "hangs", "non_kdcache_exceptions", "verify_missed_invalid",
                "harness_errors"):
        assert figures[key] == 0, (key, figures["failures"])
    assert out.returncode == 0
    # Every family really ran and damaged datasets were refused (the fuzz is not vacuous).
    assert all(sum(c.values()) > 0 for c in figures["by_family"].values())
    assert figures["verify"].get("refused", 0) > 0.8 * figures["cases"]
