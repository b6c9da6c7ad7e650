"""Datasets of an older minor format version still read: a 1.0.0 dataset (before
`packing.targets`) verifies and decodes to the arrays it was written with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy-1.0" / "qrank-topk"


def test_a_1_0_dataset_reads_and_verifies(tmp_path):
    from kdcache.formats.reader import open_dataset
    from kdcache.formats.verify import verify_dataset

    root = tmp_path / "ds"
    root.mkdir()
    for name in ("manifest.json", "shards", "codec"):
        src = LEGACY / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format_version"] == "1.0.0" and "targets" not in manifest["packing"]
    report = verify_dataset(str(root))
    assert report.ok, report.problems
    ds = open_dataset(str(root))
    with np.load(LEGACY / "decoded.npz", allow_pickle=False) as want:
        for i in range(len(ds)):
            w = ds[i]
            np.testing.assert_array_equal(w.ids.numpy(), want[f"w{i}_ids"])
            np.testing.assert_array_equal(w.valid.numpy(), want[f"w{i}_valid"])
            np.testing.assert_array_equal(w.logprobs.numpy(), want[f"w{i}_values"])
