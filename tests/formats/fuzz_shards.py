"""Fuzz driver: mutated shard bytes fed to the reader and to verify (run by test_fuzz.py in a
subprocess under memory and time limits, so a crash or a runaway allocation fails the test)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.errors import KdcacheError
from kdcache.formats.codecs import default_codec
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.reader import LogitDataset
from kdcache.formats.synthetic import synthetic_window
from kdcache.formats.verify import verify_dataset
from kdcache.formats.writer import DatasetWriter

N, K, V = 96, 8, 3000


def build(root: Path, kind: str) -> None:
    header = DatasetHeader(kind=kind, k=K, vocab_size=V, codec=default_codec(kind),
                           packing={"window": N, "mode": "document", "bos_id": 1, "eos_id": 2})
    with DatasetWriter(root, header, windows_per_shard=3) as w:
        for i in range(3):
            w.add(synthetic_window(np.random.default_rng(i), i, N, V, K, kind=kind,
                                   doc_len=(8, 40)))


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**9), st.integers(0, 255)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**9), st.integers(0, 255)),
)


def mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for kind, pos, val in ops:
        if not buf:
            break
        pos %= len(buf)
        if kind == "flip":
            buf[pos] ^= val
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf.insert(pos, val)
        else:
            buf[pos:pos + 8] = bytes([val]) * len(buf[pos:pos + 8])
    return bytes(buf)


def run(kind: str, examples: int) -> None:
    base = Path(tempfile.mkdtemp())
    clean = base / "clean"
    build(clean, kind)
    shard = "shards/shard-00000.arrow"
    original = (clean / shard).read_bytes()

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(mutation, min_size=1, max_size=4))
    def check(ops):
        work = base / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(clean, work)
        data = mutate(original, ops)
        (work / shard).write_bytes(data)
        report = verify_dataset(work)  # must report, never raise
        if data != original:
            assert not report.ok
        # Also read with the manifest patched to the mutated file, so the Arrow and codec
        # parsers (not just the hash check) see the damage.
        mpath = work / "manifest.json"
        manifest = json.loads(mpath.read_text())
        manifest["shards"][0].update(bytes=len(data), xxh3=xxhash.xxh3_64(data).hexdigest())
        mpath.write_text(json.dumps(manifest))
        try:
            ds = LogitDataset(work, verify_hashes=False)
            for i in range(manifest["shards"][0]["windows"]):
                ds[i]
        except KdcacheError:
            pass
        verify_dataset(work)

    check()
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    for kind in ("topk", "sampled"):
        run(kind, examples)
    print("fuzz ok")
