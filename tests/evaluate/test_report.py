"""Evaluation reports: JSON written atomically (formats.storage), numpy values as lists."""

import json

import numpy as np

from kdcache.evaluate.report import write_json


def test_report_json_is_written_atomically(tmp_path):
    path = tmp_path / "out" / "report.json"
    write_json(str(path), {"x": np.arange(3)})
    assert json.loads(path.read_text()) == {"x": [0, 1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]
