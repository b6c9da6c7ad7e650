"""Checkpoint diff: the fixture's model B differs from A only in head 1, RoPE pairs 24..31."""

import json
import os

from kdcache.cli import main

CHANGED = {64 + j for j in [*range(24, 32), *range(56, 64)]}  # dims of head 1, pairs 24..31


def test_diff_finds_exactly_the_changed_dimensions(tiny_model_dir, tiny_model_dir_b, tmp_path):
    out = str(tmp_path / "diff")
    rc = main(["diff", tiny_model_dir, tiny_model_dir_b, "--out", out, "--block", "64",
               "--repeats", "6", "--layers", "0"])
    assert rc == 0
    with open(os.path.join(out, "diff.json")) as f:
        result = json.load(f)
    for name in result["plots"]:
        assert os.path.getsize(os.path.join(out, name)) > 10_000
    layer = result["layers"]["0"]
    pre = layer["pre_by_dim"]
    assert len(pre) == 128
    changed = [d for d, v in enumerate(pre) if v > 1e-4]
    assert set(changed) == CHANGED
    # The same rotation is applied to both models, so post-RoPE differences stay in head 1's
    # pairs 24..31 (a pair mixes dims i and i + 32 of its head).
    post_changed = {d for d, v in enumerate(layer["post_by_dim"]) if v > 1e-4}
    assert post_changed <= CHANGED and post_changed
    by_pair = layer["pre_by_pair"]
    assert min(by_pair[24:]) > 0 and max(by_pair[:24]) < 1e-4
    # Pre-RoPE queries of the repeated block do not depend on position: flat per position.
    per_position = layer["pre_by_position"]
    assert max(per_position) - min(per_position) < 1e-4 * max(per_position)
    assert result["positions"] == [r * 64 + 62 for r in range(6)]


def test_diff_rejects_mismatched_models(tiny_model_dir, tmp_path, capsys):
    assert main(["diff", tiny_model_dir, str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["diff", tiny_model_dir, tiny_model_dir, "--out", str(tmp_path / "o"),
                 "--block", "16", "--repeats", "2", "--layers", "7"]) == 2
    assert "layer 7 out of range" in capsys.readouterr().err
