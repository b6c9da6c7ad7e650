"""Object storage vs local disk: the same dump and the same training run, to s3:// and to a path.

    python bench/bench_s3.py [--rounds 3] [--documents 200] [--train-steps 12]

Starts an S3-compatible server on the loopback (moto's server mode, as the tests do; it keeps
objects in memory, so the figures show kdcache's own overhead on object storage: uploads instead
of rename, downloads into the shard cache, the extra requests, not a real network). Then, rounds
interleaved (median):

  dump   `run_dump` of the built-in corpus with the HF engine on a tiny teacher (one engine actor,
         started once), --out a local folder vs --out s3://bucket/...: tokens/s.
  train  the same tiny training run (1-layer student) from the local dataset vs its copy on
         s3:// with a cold shard cache each round: wall seconds of trainer.fit, tokens/s.

Prints one JSON line with both throughputs and the ratio s3/local (1.0 = no cost).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests import s3_server  # noqa: E402


def _upload(client, bucket: str, local: str, prefix: str) -> None:
    for dirpath, _, files in os.walk(local):
        for name in files:
            path = os.path.join(dirpath, name)
            client.upload_file(path, bucket, f"{prefix}/{os.path.relpath(path, local)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--documents", type=int, default=200, help="built-in corpus documents")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--train-steps", type=int, default=12)
    args = ap.parse_args()

    server = s3_server.start_moto()
    os.environ.update(server.env, AWS_DEFAULT_REGION="us-east-1")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    tmp = tempfile.mkdtemp(prefix="kdcache-bench-s3-")
    try:
        return _run(args, server, tmp)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _throughput(tokens: int, times: dict[str, list[float]]) -> dict:
    """Median tokens/s of each side and their ratio (s3 / local)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tokens": tokens, "local_tokens_per_s": round(tokens / med["local"], 1),
            "s3_tokens_per_s": round(tokens / med["s3"], 1),
            "ratio_s3_over_local": round(med["local"] / med["s3"], 3),
            "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()}}


def _dump_rounds(args, server, tmp: str) -> dict:
    import ray

    from kdcache.teacher_dump.engines.base import EngineConfig
    from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher
    from kdcache.teacher_dump.plan import DumpConfig
    from kdcache.teacher_dump.runner import run_dump
    from kdcache.teacher_dump.workers import DumpWorker

    teacher = os.path.join(tmp, "teacher")
    build_teacher(teacher, TeacherConfig.preset("tiny"), log=lambda m: None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        engine = EngineConfig(model=teacher, k=16, window=args.window, mode="document",
                              device="cpu")
        actor = ray.remote(DumpWorker).options(num_cpus=1, max_restarts=0).remote(
            "hf", asdict(engine))
        bucket = server.new_bucket("bench")
        times: dict[str, list[float]] = {"local": [], "s3": []}
        tokens = 0
        for r in range(args.rounds + 1):  # round 0 warms up (engine, numba, page cache)
            for where in ("local", "s3"):
                out = (os.path.join(tmp, f"dump-{r}") if where == "local"
                       else f"s3://{bucket}/dump-{r}")
                cfg = DumpConfig.from_options(model=teacher, corpus="builtin", out=out, k=16,
                                 window=args.window, mode="document", engine="hf",
                                 builtin_documents=args.documents, windows_per_shard=4,
                                 workers=1, progress=False, device="cpu")
                t0 = time.perf_counter()
                summary = run_dump(cfg, actors=[actor], log=lambda m: None)
                if r:
                    times[where].append(time.perf_counter() - t0)
                tokens = summary["tokens"]
        ray.kill(actor)
    finally:
        ray.shutdown()
    return _throughput(tokens, times)


def _train_rounds(args, server, tmp: str) -> dict:
    from kdcache.formats.synthetic import write_synthetic_dataset
    from kdcache.student_train.stages import parse_run, run

    local = os.path.join(tmp, "train-ds")
    windows, window = 32, 1024
    write_synthetic_dataset(local, windows=windows, window=window, vocab_size=2048, k=16,
                            windows_per_shard=4, doc_len=(32, 512))
    bucket = server.new_bucket("bench")
    _upload(server.client(), bucket, local, "ds")
    url = f"s3://{bucket}/ds"

    def config(path: str, out: str) -> dict:
        base = {"model": {"preset": "tiny", "vocab_size": "dataset",
                          "overrides": {"n_layer": 1}},
                "data": {"paths": [path], "seed": 7, "batch_windows": 2},
                "loss": {"alpha": 1.0},
                "optim": {"lr": 3e-3, "warmup_steps": 2, "total_steps": args.train_steps},
                "trainer": {"max_steps": args.train_steps, "checkpoint_every": 10_000,
                            "progress_bar": False, "log_every_n_steps": 1,
                            "accelerator": "cpu"}}
        return {"name": "bench", "output_dir": out, "defaults": base, "stages": [{"name": "s1"}]}

    times: dict[str, list[float]] = {"local": [], "s3": []}
    for r in range(args.rounds + 1):
        for where, path in (("local", local), ("s3", url)):
            os.environ["KDCACHE_CACHE_DIR"] = os.path.join(tmp, f"cache-{r}-{where}")  # cold
            summary = run(parse_run(config(path, os.path.join(tmp, f"run-{r}-{where}"))),
                          resume=False)[0]
            if r:
                times[where].append(summary["seconds"])
    tokens = args.train_steps * 2 * window
    return _throughput(tokens, times)


def _run(args, server, tmp: str) -> int:
    import logging
    import platform

    logging.disable(logging.WARNING)
    result = {"bench": "s3_vs_local", "server": "moto_server (loopback, in-memory)",
              "rounds": args.rounds, "cpus": os.cpu_count(), "platform": platform.machine(),
              "dump": _dump_rounds(args, server, tmp), "train": _train_rounds(args, server, tmp)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
