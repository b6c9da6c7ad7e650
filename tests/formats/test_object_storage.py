"""Datasets on object storage, against a real S3-compatible server (moto_server on the loopback):
write, verify, inspect and read over s3://, the shard cache's bound, failed uploads that leave
nothing behind, and clear errors for a missing bucket, wrong credentials and a dropped network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from kdcache.errors import FormatError, KdcacheError
from kdcache.formats import remote, storage
from kdcache.formats.reader import open_dataset
from kdcache.formats.synthetic import write_synthetic_dataset
from kdcache.formats.verify import verify_dataset
from tests import s3_server

SYNTH = dict(windows=6, window=256, vocab_size=4000, k=8, windows_per_shard=2, doc_len=(16, 128))


def _kdcache(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "kdcache.cli", *args], capture_output=True,
                          text=True, env=full_env, timeout=300)


@pytest.fixture(scope="module")
def local_and_remote(s3, tmp_path_factory):
    """The same synthetic dataset written once locally and once straight to s3://."""
    local = str(tmp_path_factory.mktemp("local") / "ds")
    url = f"s3://{s3.new_bucket()}/datasets/synth"
    write_synthetic_dataset(local, **SYNTH)
    write_synthetic_dataset(url, **SYNTH)
    return local, url


def _windows(path: str, **kw) -> list[tuple]:
    ds = open_dataset(path, **kw)
    return [(w.window_index, w.tokens.numpy(), w.valid.numpy(), w.ids.numpy(), w.logprobs.numpy())
            for w in ds.iter_windows()]


def test_dataset_written_to_s3_reads_back_identical(local_and_remote, tmp_path):
    local, url = local_and_remote
    cache = remote.ShardCache(tmp_path / "cache")
    a, b = _windows(local), _windows(url, cache=cache)
    assert len(a) == len(b) == SYNTH["windows"]
    for x, y in zip(a, b):
        assert x[0] == y[0]
        for u, v in zip(x[1:], y[1:]):
            np.testing.assert_array_equal(u, v)
    ma, mb = open_dataset(local).manifest, open_dataset(url, cache=cache).manifest
    assert [s["xxh3"] for s in ma["shards"]] == [s["xxh3"] for s in mb["shards"]]


def test_no_temporaries_or_unfinished_uploads_on_s3(s3, local_and_remote):
    _, url = local_and_remote
    bucket, prefix = url[5:].split("/", 1)
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    names = {k[len(prefix) + 1:] for k in keys}
    assert {"README.md", "codec/table.bin", "manifest.json"} <= names
    assert sorted(n for n in names if n.startswith("shards/")) == [
        f"shards/shard-{i:05d}.arrow" for i in range(3)]
    assert not [n for n in names if storage.TMP_MARKER in n]
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_verify_and_inspect_cli_on_s3(local_and_remote):
    _, url = local_and_remote
    out = _kdcache("verify", url, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["windows_checked"] == SYNTH["windows"]
    out = _kdcache("inspect", url, "--json", "--window", "1")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["preview"]["window"] == 1


def test_verify_finds_a_corrupted_object(s3, tmp_path):
    url = f"s3://{s3.new_bucket()}/ds"
    manifest = write_synthetic_dataset(url, **SYNTH)
    bucket = url[5:].split("/")[0]
    key = "ds/" + manifest["shards"][1]["name"]
    body = bytearray(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.client().put_object(Bucket=bucket, Key=key, Body=bytes(body))
    report = verify_dataset(url)
    assert not report.ok and any("xxh3" in p and "shard-00001" in p for p in report.problems)


def test_shard_cache_stays_within_its_bound(local_and_remote, tmp_path):
    _, url = local_and_remote
    largest = max(s["bytes"] for s in open_dataset(url, cache=remote.ShardCache(
        tmp_path / "probe")).manifest["shards"])
    cache = remote.ShardCache(tmp_path / "cache", max_bytes=largest + largest // 2)
    ds = open_dataset(url, cache=cache, max_open_shards=64)
    assert ds.max_open_shards == 1  # only what the cache holds is kept open
    for _ in range(2):
        for i in range(len(ds)):
            ds[i]
            assert cache.bytes_used() <= cache.max_bytes
    assert len(os.listdir(cache.directory)) == 1


def test_corrupt_download_is_reported_and_not_cached(s3, tmp_path):
    url = f"s3://{s3.new_bucket()}/ds"
    manifest = write_synthetic_dataset(url, **SYNTH)
    bucket = url[5:].split("/")[0]
    key = "ds/" + manifest["shards"][0]["name"]
    body = bytearray(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    body[100] ^= 0x01
    s3.client().put_object(Bucket=bucket, Key=key, Body=bytes(body))
    cache = remote.ShardCache(tmp_path / "cache")
    ds = open_dataset(url, cache=cache, verify_hashes=False)  # the cache checks regardless
    with pytest.raises(FormatError, match="xxh3"):
        ds[0]
    assert cache.bytes_used() == 0


@pytest.mark.parametrize("size,block", [(3 << 20, None), (12 << 20, 5 << 20)])
def test_failed_upload_publishes_nothing(s3, size, block):
    """An error midway through a write (one-shot PUT, or a multipart upload) leaves no object
    under the final name and no unfinished multipart upload."""
    import s3fs

    bucket = s3.new_bucket()
    kw = {"default_block_size": block} if block else {}
    fs = remote.guard(s3fs.S3FileSystem(skip_instance_cache=True, **kw))
    path = f"{bucket}/ds/shards/shard-00000.arrow"

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with storage.atomic_writer(fs, path) as out:
            out.write(os.urandom(size - 1024))
            raise Boom
    client = s3.client()
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    with storage.atomic_writer(fs, path) as out:  # and the same path then writes normally
        out.write(b"x" * size)
    assert fs.size(path) == size


def test_missing_bucket_is_a_clear_error_and_never_created(s3, tmp_path):
    url = "s3://kdcache-no-such-bucket/ds"
    out = _kdcache("inspect", url)
    assert out.returncode == 2
    assert "bucket does not exist" in out.stderr and "Traceback" not in out.stderr
    out = _kdcache("verify", url)
    assert out.returncode == 1 and "PROBLEM" in out.stdout and "bucket does not exist" in out.stdout
    with pytest.raises(remote.RemoteStorageError, match="bucket does not exist"):
        write_synthetic_dataset(url, **SYNTH)
    buckets = [b["Name"] for b in s3.client().list_buckets()["Buckets"]]
    assert "kdcache-no-such-bucket" not in buckets


def test_wrong_credentials_are_a_clear_error(tmp_path):
    server = s3_server.start_authenticating_moto()
    try:
        bucket = server.new_bucket()
        url = f"s3://{bucket}/ds"
        good = _kdcache("inspect", url, env=server.env)  # right key: the bucket answers
        assert good.returncode == 2 and "manifest.json: missing" in good.stderr
        bad = _kdcache("inspect", url, env=dict(server.env, AWS_SECRET_ACCESS_KEY="wrong"))
        assert bad.returncode == 2, bad.stderr
        assert "access denied" in bad.stderr and "AWS_ACCESS_KEY_ID" in bad.stderr
        assert "Traceback" not in bad.stderr
    finally:
        server.stop()


def test_dropped_connection_retries_then_fails_clearly(local_and_remote, s3):
    _, url = local_and_remote
    proxy = s3_server.CuttableProxy(s3.port)
    try:
        proxy.cut()
        out = _kdcache("inspect", url, env={"AWS_ENDPOINT_URL": proxy.endpoint,
                                           "KDCACHE_REMOTE_RETRIES": "2"})
        assert out.returncode == 2
        assert "cannot reach the object store" in out.stderr and "Traceback" not in out.stderr
        assert out.stderr.count("retrying in") == 2
    finally:
        proxy.close()


def test_dropped_connection_recovers_within_retries(local_and_remote, s3):
    import s3fs

    _, url = local_and_remote
    proxy = s3_server.CuttableProxy(s3.port)
    try:
        fs = remote.guard(s3fs.S3FileSystem(skip_instance_cache=True,
                                            endpoint_url=proxy.endpoint))
        path = url[5:] + "/manifest.json"
        first = fs.cat_file(path)
        proxy.cut()
        restored = threading.Timer(0.3, proxy.restore)
        restored.start()
        again = fs.cat_file(path)  # retried (botocore's attempts, then kdcache's backoff)
        restored.join()
        assert again == first and proxy.refused >= 1
    finally:
        proxy.close()


def test_remote_errors_are_kdcache_errors():
    assert issubclass(remote.RemoteStorageError, KdcacheError)
