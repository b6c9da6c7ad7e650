"""Training that streams its shards from s3:// (the session's moto S3 server) through a bounded
local shard cache: the same losses as training from the local copy, and the cache never holds
more than its bound."""

from __future__ import annotations

import os

import pytest

from kdcache.student_train.stages import parse_run, run
from tests.student_train.test_train import Record

pytestmark = pytest.mark.slow


def _upload(client, bucket: str, local: str, prefix: str) -> None:
    for dirpath, _, files in os.walk(local):
        for name in files:
            path = os.path.join(dirpath, name)
            client.upload_file(path, bucket, f"{prefix}/{os.path.relpath(path, local)}")


def test_training_from_s3_matches_local_with_a_bounded_cache(s3, doc_dataset, tmp_path, tiny_run,
                                                             monkeypatch):
    from kdcache.formats.reader import open_dataset

    bucket = s3.new_bucket()
    _upload(s3.client(), bucket, doc_dataset, "ds")
    url = f"s3://{bucket}/ds"
    shard_bytes = [s["bytes"] for s in open_dataset(doc_dataset).manifest["shards"]]
    assert len(shard_bytes) >= 3
    bound = max(shard_bytes) * 2  # two of the three shards: the third must evict one
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("KDCACHE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("KDCACHE_CACHE_BYTES", str(bound))

    def train(path: str, out: str) -> list:
        raw = tiny_run([path], tmp_path / out, steps=6, checkpoint_every=3)
        raw["defaults"]["data"]["batch_windows"] = 2
        seen: list = []
        run(parse_run(raw), callbacks=[Record(seen)])
        return seen

    local = train(doc_dataset, "local")
    remote = train(url, "remote")
    assert [loss for loss, _ in remote] == [loss for loss, _ in local]
    for (_, a), (_, b) in zip(remote, local):
        assert (a == b).all()
    cached = [os.path.getsize(cache_dir / f) for f in os.listdir(cache_dir)]
    assert cached and sum(cached) <= bound and len(cached) < len(shard_bytes)
