"""`kdcache dump --out s3://...` against the session's S3 server (moto on the loopback): a dump
SIGKILLed mid-run resumes to the same dataset as an uninterrupted local dump.

On S3 there is no rename: a shard is uploaded straight to its final key and becomes visible only
when its upload completes; the driver then writes `progress/<shard>.json`. A shard object with no
completion record (killed between the two) is simply written again on resume, and manifest.json
is still the last object put, so readers never see an unfinished dataset.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kdcache.formats.verify import verify_dataset
from kdcache.teacher_dump.runner import run_dump

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, teacher_dir, hf_workers, small_dump_config):
    out = tmp_path_factory.mktemp("s3ref") / "ds"
    run_dump(small_dump_config(teacher_dir, out), actors=hf_workers)
    return str(out)


def _keys(client, bucket: str, prefix: str) -> list[str]:
    resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"][len(prefix):] for o in resp.get("Contents", [])]


def test_s3_dump_killed_then_resumed_equals_local(s3, local_reference, read_all, teacher_dir,
                                                  ray_address, hf_workers, small_dump_config):
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/dumps/ds"
    client = s3.client()
    cmd = [sys.executable, "-m", "kdcache.cli", "dump", "--model", teacher_dir, "--corpus",
           "builtin", "--builtin-documents", "24", "--out", url, "--window", "256", "--k", "8",
           "--engine", "hf", "--windows-per-shard", "2", "--workers", "1", "--codec", "raw",
           "--ray-address", ray_address, "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while not any(k.startswith("progress/") for k in _keys(client, bucket, "dumps/ds/")):
            assert proc.poll() is None, "dump ended before the kill point"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    keys = _keys(client, bucket, "dumps/ds/")
    assert "plan.json" in keys and "manifest.json" not in keys
    recorded = {k[len("progress/"):-len(".json")] for k in keys if k.startswith("progress/")}
    # A shard object without its completion record (as a kill between upload and record leaves):
    # garbage under the next shard's name must be rewritten, not trusted.
    pending = sorted(f"shard-{i:05d}" for i in range(5)
                     if f"shard-{i:05d}" not in recorded)[0]
    client.put_object(Bucket=bucket, Key=f"dumps/ds/shards/{pending}.arrow", Body=b"partial")

    summary = run_dump(small_dump_config(teacher_dir, url, workers=1), actors=hf_workers[:1])
    assert summary["shards_skipped"] >= len(recorded) >= 1
    keys = _keys(client, bucket, "dumps/ds/")
    assert "manifest.json" in keys and not [k for k in keys if ".tmp-" in k or k.startswith(
        "progress/")]
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert verify_dataset(url).ok

    ma, wa = read_all(local_reference)
    mb, wb = read_all(url)
    assert [s["name"] for s in ma["shards"]] == [s["name"] for s in mb["shards"]]
    assert ma["packing"] == mb["packing"] and ma["targets"] == mb["targets"]
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        assert x[0] == y[0]
        for u, v in zip(x[1:5], y[1:5]):
            np.testing.assert_array_equal(u, v)
        np.testing.assert_array_equal(x[5][x[3]], y[5][y[3]])
