"""Run by test_runner.py in its own process: a real multi-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`: one raylet per node) whose nodes declare logical GPUs, and dumps
placed on it with --tensor-parallel 2. The HF engine runs on the CPU here (there is no CUDA), but
Ray's placement and GPU accounting are the real ones. Prints one JSON line.

Usage: python -m tests.teacher_dump.placement_cluster TEACHER_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys


def main(teacher_dir: str, out: str) -> None:
    from ray.cluster_utils import Cluster

    from kdcache.errors import KdcacheError
    from kdcache.teacher_dump.plan import DumpConfig
    from kdcache.teacher_dump.runner import run_dump

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        cluster.add_node(num_cpus=2, num_gpus=4)
        cluster.add_node(num_cpus=2, num_gpus=2)
        cluster.wait_for_nodes()

        def config(workers: int, path: str, **options) -> DumpConfig:
            return DumpConfig.from_options(**{
                "model": teacher_dir, "corpus": "builtin", "out": path, "k": 8, "window": 256,
                "mode": "document", "engine": "hf", "builtin_documents": 24,
                "windows_per_shard": 2, "workers": workers, "tensor_parallel": 2,
                "ray_address": cluster.address, "progress": False, "codec": "raw", **options})

        result: dict = {}
        for key, cfg in (  # 4 groups of 2 GPUs do not fit on nodes of 4 and 2 GPUs; asked to
                ("refused", config(4, out + "-refused")),  # share, 13 halves of 6 GPUs neither
                ("refused_shared", config(13, out + "-refused-shared", tensor_parallel=1,
                                          engines_per_gpu=2))):
            try:
                run_dump(cfg, log=lambda m: None)
                result[key] = None
            except KdcacheError as exc:
                result[key] = str(exc)
        summary = run_dump(config(3, out), log=lambda m: None)
        result["summary"] = summary
        print(json.dumps(result))
    finally:
        import ray

        ray.shutdown()  # the driver first: Cluster refuses to remove the node it is attached to
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
