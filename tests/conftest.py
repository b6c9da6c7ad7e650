"""Session-wide test settings. Component fixtures live in tests/<component>/conftest.py."""

import os
import tempfile

# Two cores on CI: keep BLAS/OpenMP from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Triton kernel tests run in Triton's interpreter (CI has no GPU). Triton reads this when a
# kernel is decorated, and other tests (vLLM, Lightning) import triton first, so it is set here,
# before anything is imported. On a GPU machine, TRITON_INTERPRET=0 tests compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Object-storage tests talk to a real S3-compatible server on the loopback (tests/s3_server.py).
# Its address and test credentials go into the environment now, before any Ray cluster starts, so
# that Ray workers and `kdcache` subprocesses inherit them; nothing here can reach real AWS.
from tests import s3_server as _s3  # noqa: E402

S3_PORT = _s3.free_port()
for _key, _value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
                     "AWS_ACCESS_KEY_ID": _s3.TEST_KEY_ID,
                     "AWS_SECRET_ACCESS_KEY": _s3.TEST_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_MAX_ATTEMPTS": "2", "KDCACHE_REMOTE_BACKOFF_S": "0.1"}.items():
    os.environ[_key] = _value
# Remote shards are cached under KDCACHE_CACHE_DIR: a per-session scratch directory, not ~/.cache.
os.environ["KDCACHE_CACHE_DIR"] = os.path.join(tempfile.mkdtemp(prefix="kdcache-tests-"), "cache")
for _key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_key, None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3():
    """The session's moto S3 server (started on first use); `s3.new_bucket()` per test."""
    server = _s3.start_moto(S3_PORT)
    yield server
    server.stop()
