"""The dump runner on a real Ray local cluster: end to end, resume, faults, refusals.

Reference: one uninterrupted HF-engine dump of the built-in corpus (~5 shards). Every interrupted
or faulty run must end with the same dataset: same shard names, tokens, offsets, valid flags and
ids, and log-probs within the engine's run-to-run noise (measured: bitwise equal on CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kdcache.errors import ConfigMismatchError, KdcacheError
from kdcache.teacher_dump.runner import run_dump

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, hf_workers, small_dump_config):
    out = tmp_path_factory.mktemp("ref") / "ds"
    summary = run_dump(small_dump_config(teacher_dir, out), actors=hf_workers)
    return str(out), summary


@pytest.fixture
def assert_same_dataset(read_all):
    return lambda a, b, atol=0.0: _assert_same(read_all, a, b, atol)


def _assert_same(read_all, a: str, b: str, atol: float) -> None:
    ma, wa = read_all(a)
    mb, wb = read_all(b)
    assert [s["name"] for s in ma["shards"]] == [s["name"] for s in mb["shards"]]
    assert [s["tokens"] for s in ma["shards"]] == [s["tokens"] for s in mb["shards"]]
    assert ma["packing"] == mb["packing"] and ma["targets"] == mb["targets"]
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        assert x[0] == y[0]
        for arr_x, arr_y in zip(x[1:5], y[1:5]):  # tokens, offsets, valid, ids
            np.testing.assert_array_equal(arr_x, arr_y)
        v = x[3]
        np.testing.assert_allclose(x[5][v], y[5][v], atol=atol, rtol=0)


def _no_temporaries(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        assert not [f for f in files if ".tmp-" in f], (dirpath, files)


def test_reference_dump_is_valid(small_dump_config, read_all, assert_same_dataset, reference):
    from kdcache.formats.verify import verify_dataset

    out, summary = reference
    report = verify_dataset(out)
    assert report.ok, report.problems
    assert summary["shards"] >= 4 and summary["shards_written"] == summary["shards"]
    manifest, windows = read_all(out)
    assert manifest["packing"]["mode"] == "document" and manifest["packing"]["bos_id"] == 1
    assert manifest["stats"]["corpus"]["documents"] == 24
    assert not os.path.exists(os.path.join(out, "progress"))
    assert os.path.exists(os.path.join(out, "plan.json"))
    # re-running a finished dump does nothing and keeps the dataset
    again = run_dump(small_dump_config(manifest["teacher"]["path"], out))
    assert again["already_complete"] and again["shards_written"] == 0


def test_default_codec_dump_fits_its_table_on_the_teacher(small_dump_config, read_all, reference,
                                                         tmp_path, teacher_dir, hf_workers):
    """The default (lossy) codec: its id ranking is fitted on the teacher's first window, stored
    with the data, reused on resume, and the decoded targets stay within the codec's KL budget."""
    from kdcache.formats.verify import verify_dataset

    out = tmp_path / "ds"
    run_dump(small_dump_config(teacher_dir, out, codec=None), actors=hf_workers)
    assert verify_dataset(str(out)).ok
    manifest, windows = read_all(str(out))
    assert manifest["codec"]["name"] == "qrank" and manifest["codec"]["params"]
    table = manifest["codec"]["table"]
    assert table["path"] == "codec/table.bin"
    assert os.path.getsize(out / "codec" / "table.bin") == table["bytes"] > 0
    _, ref = read_all(reference[0])
    kls = []
    for x, y in zip(windows, ref):
        v = x[3]
        np.testing.assert_array_equal(np.sort(x[4][v], axis=1), np.sort(y[4][v], axis=1))
        p = np.exp(y[5][v].astype(np.float64))
        p /= p.sum(1, keepdims=True)
        q = np.exp(x[5][v].astype(np.float64))
        q /= q.sum(1, keepdims=True)
        order_p, order_q = np.argsort(y[4][v], 1), np.argsort(x[4][v], 1)
        p, q = np.take_along_axis(p, order_p, 1), np.take_along_axis(q, order_q, 1)
        kls.append((p * np.log(p / q)).sum(1))
    assert np.concatenate(kls).mean() < 1e-3


def test_vllm_dump_through_ray_matches_hf(small_dump_config, read_all, assert_same_dataset,
                                          reference, tmp_path, teacher_dir, vllm_workers):
    out = tmp_path / "vllm"
    summary = run_dump(small_dump_config(teacher_dir, out, engine="vllm", workers=1),
                       actors=[vllm_workers["pooler"]])
    assert summary["shards_written"] == summary["shards"]
    ref_manifest, ref = read_all(reference[0])
    manifest, got = read_all(str(out))
    assert manifest["teacher"]["engine"] == "vllm"
    worst = 0.0
    for x, y in zip(ref, got):
        np.testing.assert_array_equal(x[1], y[1])
        v = x[3]
        same = x[4][v] == y[4][v]
        assert same.mean() > 0.98  # ids differ only where two log-probs (near-)tie
        both = same.all(axis=1)
        worst = max(worst, float(np.abs(x[5][v][both] - y[5][v][both]).max()))
    assert worst < 1e-4


class _Interrupt(Exception):
    pass


def test_resume_after_interrupt_equals_uninterrupted(small_dump_config, read_all,
                                                     assert_same_dataset, reference, tmp_path,
                                                     teacher_dir, hf_workers):
    """One engine holds SHARDS_PER_ACTOR shards at once (one computing, one being written):
    stopped after its first shard, the shard in flight behind it still finishes and is recorded,
    then the resume (two engines) writes the rest."""
    from kdcache.teacher_dump.workers import SHARDS_PER_ACTOR

    out = tmp_path / "ds"

    def stop_after_one(name, info, pool):
        raise _Interrupt

    with pytest.raises(_Interrupt):
        run_dump(small_dump_config(teacher_dir, out, workers=1), actors=hf_workers[:1],
                 on_shard_done=stop_after_one)
    assert not os.path.exists(out / "manifest.json")
    summary = run_dump(small_dump_config(teacher_dir, out), actors=hf_workers)
    assert summary["shards_skipped"] == SHARDS_PER_ACTOR  # in-flight shards finish first
    assert summary["shards_written"] >= 1
    assert_same_dataset(reference[0], str(out))


def test_sigkill_dump_at_several_points_then_resume(small_dump_config, read_all,
                                                    assert_same_dataset, reference, tmp_path,
                                                    teacher_dir, ray_address, hf_workers):
    """SIGKILL `kdcache dump` (a separate process on the same Ray cluster) right after the plan
    is written and again after its first shard, then resume: same dataset."""
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "kdcache.cli", "dump", "--model", teacher_dir, "--corpus",
           "builtin", "--builtin-documents", "24", "--out", str(out), "--window", "256", "--k",
           "8", "--engine", "hf", "--windows-per-shard", "2", "--workers", "1", "--codec", "raw",
           "--ray-address",
           ray_address, "--json"]

    def run_until(condition) -> None:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        try:
            while not condition():
                assert proc.poll() is None, "dump ended before the kill point"
                assert time.monotonic() < deadline, "kill point never reached"
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    run_until(lambda: (out / "plan.json").exists())
    progress = out / "progress"
    run_until(lambda: progress.exists() and len(list(progress.glob("*.json"))) >= 1)
    done_before = len(list(progress.glob("*.json")))
    assert not (out / "manifest.json").exists()
    summary = run_dump(small_dump_config(teacher_dir, out, workers=1), actors=hf_workers[:1])
    assert summary["shards_skipped"] >= done_before >= 1
    _no_temporaries(str(out))
    assert_same_dataset(reference[0], str(out))


def test_killed_actor_shard_is_retried(small_dump_config, read_all, assert_same_dataset,
                                       reference, tmp_path, teacher_dir, ray_address):
    out = tmp_path / "ds"
    killed = []

    def kill_one_actor(name, info, pool):
        if not killed:
            killed.append(pool.pids[0])
            os.kill(pool.pids[0], signal.SIGKILL)

    summary = run_dump(small_dump_config(teacher_dir, out), on_shard_done=kill_one_actor,
                       log=lambda m: None)
    assert killed and summary["actor_failures"] >= 1 and summary["retries"] >= 1
    assert_same_dataset(reference[0], str(out))


def test_changed_config_is_refused(small_dump_config, read_all, assert_same_dataset, reference,
                                   tmp_path, teacher_dir):
    out = tmp_path / "ds"
    shutil.copytree(reference[0], out)
    for change in ({"k": 4}, {"window": 512}, {"mode": "causal"}, {"seed": 1},
                   {"builtin_documents": 25}):
        with pytest.raises(ConfigMismatchError, match="refusing to mix targets"):
            run_dump(small_dump_config(teacher_dir, out, **change))
    with pytest.raises(ConfigMismatchError, match="document-global"):
        run_dump(small_dump_config(teacher_dir, tmp_path / "x", engine="vllm",
                                   mode="document-global"))


def test_overwrite_replaces_a_dump_of_another_configuration(small_dump_config, read_all,
                                                           reference, tmp_path, teacher_dir,
                                                           hf_workers):
    out = tmp_path / "ds"
    shutil.copytree(reference[0], out)
    with pytest.raises(ConfigMismatchError, match="--overwrite"):
        run_dump(small_dump_config(teacher_dir, out, k=4), actors=hf_workers)
    summary = run_dump(small_dump_config(teacher_dir, out, k=4), actors=hf_workers,
                       overwrite=True)
    manifest, windows = read_all(str(out))
    assert manifest["targets"]["k"] == 4 and summary["shards_written"] == summary["shards"]
    assert all(w[4].shape[1] == 4 for w in windows)


def test_full_disk_leaves_no_partial_shard(small_dump_config, read_all, assert_same_dataset,
                                           tmp_path, teacher_dir, hf_workers):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tiny tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        with pytest.raises(KdcacheError, match="no space left on device") as err:
            run_dump(small_dump_config(teacher_dir, mnt / "ds", codec=None), actors=hf_workers)
        assert "shard-" in str(err.value)
        _no_temporaries(str(mnt))
        import pyarrow.ipc as ipc

        from kdcache.teacher_dump.plan import completed_shards

        # every visible shard is a complete Arrow file (a truncated one has no footer); shards
        # not recorded as done (the record itself may not fit) are rewritten on resume
        for path in (mnt / "ds" / "shards").glob("*.arrow"):
            assert ipc.open_file(str(path)).num_record_batches >= 1
        assert set(completed_shards(str(mnt / "ds"))) <= {
            p.stem for p in (mnt / "ds" / "shards").glob("*.arrow")}
        assert not (mnt / "ds" / "manifest.json").exists()
    finally:
        subprocess.run(["umount", str(mnt)])


def test_tensor_parallel_groups_are_placed_on_a_multi_node_cluster(read_all, assert_same_dataset,
                                                                   reference, tmp_path,
                                                                   teacher_dir):
    """--tensor-parallel 2 --workers 3 on a real 3-raylet Ray cluster whose nodes hold 4 and 2
    logical GPUs: one placement group per engine, each on one node with 2 GPUs of its own, no
    GPU given to two engines; 4 engines are refused with the numbers; same dataset as tp=1."""
    import tempfile

    out = tmp_path / "tp"
    # its own Ray temp dir: the cluster's address file must not attract other Ray drivers
    ray_tmp = tempfile.mkdtemp(prefix="kdray-", dir="/tmp")
    try:
        proc = subprocess.run([sys.executable, "-m", "tests.teacher_dump.placement_cluster",
                               teacher_dir, str(out)], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "RAY_TMPDIR": ray_tmp},
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "room for 3" in result["refused"] and "--workers 4" in result["refused"]
    assert "room for 12" in result["refused_shared"]  # --engines-per-gpu 2: half a GPU each
    engines = result["summary"]["engines"]
    assert len(engines) == 3 and all(len(e["gpu_ids"]) == 2 for e in engines)
    by_node: dict[str, list[str]] = {}
    for e in engines:
        by_node.setdefault(e["node_id"], []).extend(e["gpu_ids"])
    assert sorted(len(g) for g in by_node.values()) == [2, 4]  # two engines on the 4-GPU node
    assert all(len(set(g)) == len(g) for g in by_node.values())  # no GPU shared
    assert result["summary"]["tensor_parallel"] == 2
    assert_same_dataset(reference[0], str(out))


def test_in_process_dump_equals_the_ray_dump_and_resumes(small_dump_config, read_all,
                                                         assert_same_dataset, reference, tmp_path,
                                                         teacher_dir):
    """--no-ray: one engine in this process writes the same dataset as Ray's actors; stopped
    after a shard, the shard computed behind it is still recorded, and the rerun ends equal."""
    out = tmp_path / "local"

    def stop_after_one(name, info, worker):
        raise _Interrupt

    cfg = small_dump_config(teacher_dir, out, workers=1, in_process=True)
    with pytest.raises(_Interrupt):
        run_dump(cfg, on_shard_done=stop_after_one)
    assert not os.path.exists(out / "manifest.json")
    recorded = sorted(os.listdir(out / "progress"))
    assert len(recorded) >= 1
    summary = run_dump(cfg)
    assert summary["shards_skipped"] == len(recorded) and summary["shards_written"] >= 1
    assert summary["engines"][0]["node_id"] == "local" and summary["engines"][0]["gpu_ids"] == []
    assert_same_dataset(reference[0], str(out))
    # the default codec: its table fitted on the in-process engine's first window, as with Ray
    qrank = tmp_path / "qrank"
    run_dump(small_dump_config(teacher_dir, qrank, workers=1, in_process=True, codec=None))
    assert os.path.getsize(qrank / "codec" / "table.bin") > 0


def test_in_process_refuses_ray_options(small_dump_config, tmp_path, teacher_dir):
    for kw in ({"workers": 2}, {"ray_address": "10.0.0.1:6379"}):
        with pytest.raises(KdcacheError, match="--no-ray"):
            small_dump_config(teacher_dir, tmp_path / "x", in_process=True, **kw)
    assert not os.path.exists(tmp_path / "x")


def test_encode_workers_write_the_bytes_one_thread_writes(small_dump_config, tmp_path,
                                                           teacher_dir, hf_workers):
    """--encode-workers: the dump's windows (large enough: 512 tokens at k=768) are encoded on
    worker processes, in this process (--no-ray) and inside Ray's actors, and the shards are
    the bytes of a dump encoded in the writer's thread."""
    from kdcache.formats.codecs import procs

    kw = dict(codec="qrank", k=768, window=512, builtin_documents=12)
    shards = []

    def dump(name, **more):
        out = tmp_path / name
        run_dump(small_dump_config(teacher_dir, out, **kw, **more))
        with open(out / "manifest.json") as f:
            shards.append([(s["name"], s["xxh3"]) for s in json.load(f)["shards"]])

    try:
        dump("inline", workers=1, in_process=True, encode_workers=1)
        dump("local", workers=1, in_process=True, encode_workers=2)
        assert 2 in procs._pools  # that dump started its encoding processes
    finally:
        procs.close_pools()
    out = tmp_path / "ray"
    run_dump(small_dump_config(teacher_dir, out, encode_workers=2, **kw), actors=hf_workers)
    with open(out / "manifest.json") as f:
        shards.append([(s["name"], s["xxh3"]) for s in json.load(f)["shards"]])
    assert shards[0] == shards[1] == shards[2] and len(shards[0]) >= 2
    with pytest.raises(KdcacheError, match="--encode-workers"):
        small_dump_config(teacher_dir, tmp_path / "x", encode_workers=0)
