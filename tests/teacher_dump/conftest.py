"""Session fixtures for teacher_dump tests: one tiny trained teacher, one Ray local cluster, one
vLLM engine per vLLM path (started in Ray actors at session start so that their slow start-up
overlaps the fast tests), and one pair of HF engine actors reused by the runner tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

TEST_WINDOW = 512  # the longest window any test uses
TEST_K_MAX = 32  # the largest k any test uses


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> str:
    from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher

    out = tmp_path_factory.mktemp("teacher") / "tiny"
    build_teacher(str(out), TeacherConfig.preset("tiny", train_seconds=8), log=lambda m: None)
    return str(out)


@pytest.fixture(scope="session")
def ray_address():
    import ray

    if ray.is_initialized():
        # an earlier test (a dump run in-process) started a cluster sized to this machine: too
        # small for the session's engine actors, whose placement groups would then never place
        ray.shutdown()
    ctx = ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                   ignore_reinit_error=True)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def _start_worker(engine: str, teacher_dir: str, **engine_kw):
    """A DumpWorker actor started by the runner's own placement code (a CPU engine's bundle)."""
    from kdcache.teacher_dump.engines.base import EngineConfig
    from kdcache.teacher_dump.workers import EnginePlacement, start_engine_actor

    cfg = EngineConfig(model=teacher_dir, k=TEST_K_MAX, window=TEST_WINDOW, mode="document",
                       **engine_kw)
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    actor, _ = start_engine_actor(engine, cfg, EnginePlacement(), env)
    return actor


@pytest.fixture(scope="session")
def vllm_workers(ray_address, teacher_dir):
    """{'pooler': actor, 'prompt-logprobs': actor}; constructors run concurrently in Ray."""
    import ray

    workers = {path: _start_worker("vllm", teacher_dir, vllm_path=path)
               for path in ("pooler", "prompt-logprobs")}
    yield workers
    for w in workers.values():
        ray.kill(w, no_restart=True)


@pytest.fixture(scope="session")
def hf_workers(ray_address, teacher_dir):
    import ray

    workers = [_start_worker("hf", teacher_dir, device="cpu") for _ in range(2)]
    yield workers
    for w in workers:
        ray.kill(w, no_restart=True)


@pytest.fixture(scope="session", autouse=True)
def _start_engines_early(request):
    """Kick off the vLLM actors' start-up (minutes on vLLM-CPU) before the first test runs."""
    if any("vllm_workers" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("vllm_workers")


def _small_dump_config(teacher_dir: str, out, **overrides):
    """A dump of the built-in corpus small enough for a 2-core CI machine (~5 shards)."""
    from kdcache.teacher_dump.plan import DumpConfig

    kw = dict(model=teacher_dir, corpus="builtin", out=str(out), k=8, window=256, mode="document",
              engine="hf", builtin_documents=24, windows_per_shard=2, workers=2, progress=False,
              device="cpu", codec="raw")
    kw.update(overrides)
    return DumpConfig.from_options(**kw)


def _read_all(path: str):
    """Every window of a dataset as numpy: [(index, tokens, offsets, valid, ids, logprobs)]."""
    from kdcache.formats.reader import open_dataset

    ds = open_dataset(path)
    out = []
    for i in range(len(ds)):
        w = ds[i]
        out.append((w.window_index, w.tokens.numpy(), w.doc_offsets.numpy(), w.valid.numpy(),
                    w.ids.numpy(), w.logprobs.numpy()))
    return ds.manifest, out


@pytest.fixture(scope="session")
def small_dump_config():
    return _small_dump_config


@pytest.fixture(scope="session")
def read_all():
    return _read_all
