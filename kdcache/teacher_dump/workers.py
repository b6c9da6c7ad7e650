"""Where the teacher runs: `DumpWorker` (one engine, writes whole shards), and its Ray plumbing.

`DumpWorker` is plain Python: the runner starts it as a Ray actor (`ActorPool`); tests and
benches may call it directly. Its engine lives on a thread of its own and its shards go through
a `ShardPipeline` (pipeline.py), so two `run_shard` calls in flight overlap: the second shard's
engine calls run while the first is still being encoded and written.

Placement: every engine gets a Ray placement group of one bundle, `{"CPU": 1, "GPU": tp * pp}`
on GPU clusters (`{"CPU": 1}` for CPU engines), strategy STRICT_PACK, and its actor runs in
that bundle owning all its GPUs (vLLM's `mp` executor spreads tensor and pipeline parallel
ranks over them inside the node). Ray never gives one GPU to two bundles, so engines never
share a GPU; `--workers` placement groups spread over the cluster's nodes (`--ray-address`).
Before any engine starts, the pool checks that the cluster's nodes can hold `workers` such
groups and refuses with the numbers otherwise.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from typing import Any

from kdcache.errors import KdcacheError
from kdcache.formats.codecs import make_codec
from kdcache.formats.manifest import DatasetHeader
from kdcache.teacher_dump.engines import make_engine
from kdcache.teacher_dump.engines.base import EngineConfig
from kdcache.teacher_dump.pack import PackedWindow
from kdcache.teacher_dump.pipeline import EngineThread, ShardPipeline, grouped_targets
from kdcache.teacher_dump.plan import DumpError

SHARDS_PER_ACTOR = 2  # in flight per engine: one computing, one being written


def window_to_dict(w: PackedWindow) -> dict[str, Any]:
    """A window as plain fields (what travels to an actor; `PackedWindow(**d)` rebuilds it)."""
    return {"window_index": w.window_index, "tokens": w.tokens, "doc_offsets": w.doc_offsets,
            "doc_ids": w.doc_ids, "doc_pieces": w.doc_pieces, "target_mask": w.target_mask}


class DumpWorker:
    """Holds one engine; turns a shard's windows into a written shard. Runs as a Ray actor.

    The engine is built once (`__init__`); `configure` binds a dataset (output, header, codec)
    and may change k and mode, so that one started engine can serve several runs (tests).
    """

    def __init__(self, engine_name: str, engine_cfg: dict) -> None:
        cfg = EngineConfig(**engine_cfg)
        self._thread = EngineThread(lambda: make_engine(engine_name, cfg))
        self.engine = self._thread.engine
        self.pipeline = ShardPipeline(self.engine)
        self.out = self.header = self.codec = self.encode_workers = None

    def configure(self, out: str, header: dict, table: bytes | None,
                  encode_workers: int | None = None) -> int:
        """Bind a dataset; `encode_workers`: its shards' encoding processes (None: the
        writer's default, this machine's CPUs up to 16)."""
        self.out = out
        self.encode_workers = encode_workers
        self.header = DatasetHeader(**header)
        self.codec = make_codec(self.header, table)
        self._thread.call(self.engine.reconfigure, k=self.header.k,
                          mode=self.header.packing["mode"],
                          window=int(self.header.packing["window"]))
        return os.getpid()

    def where(self) -> dict[str, Any]:
        """This engine's process, node and GPUs (as Ray assigned them)."""
        import ray

        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(),
                "node_ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def where_local(self) -> dict[str, Any]:
        """The same for an engine run in the caller's process without Ray: its visible GPUs."""
        gpus = [] if getattr(self.engine, "device", "") == "cpu" else _visible_gpus()
        return {"pid": os.getpid(), "node_id": "local", "node_ip": "127.0.0.1", "gpu_ids": gpus}

    def topk(self, windows: list[dict], call_tokens: int | None = None,
             feed: bool = False) -> list[tuple]:
        """Raw engine output (ids, logprobs, valid) per window; for tests and benches. One
        engine call, or (`call_tokens`) the pipeline's groups of about that many tokens, fed
        ahead when `feed` and the engine can (pipeline.grouped_targets)."""
        wins = [PackedWindow(**w) for w in windows]
        if call_tokens is None:
            out = self._thread.call(self.engine.topk, wins)
        else:
            out = self._thread.call(grouped_targets, self.engine, wins, call_tokens, feed)
        return [(t.ids, t.logprobs, t.valid) for t in out]

    def limit_feed(self, max_requests: int | None = None, max_tokens: int | None = None) -> None:
        """Other caps on what `topk(feed=True)` keeps queued in the engine (engine.limit_feed)."""
        self._thread.call(self.engine.limit_feed, max_requests, max_tokens)

    def feed_stats(self) -> dict[str, int]:
        """The engine's feed caps and the most they held at once (engine.feed_stats)."""
        return self._thread.call(self.engine.feed_stats)

    def start_shard(self, name: str, windows: list[PackedWindow]) -> Future:
        """Compute a shard's targets (returns once the engine is done with it); the future
        holds its ShardInfo once the shard is written behind the next shard's engine calls."""
        return self._thread.call(self.pipeline.start, self.out, name, windows, self.header,
                                 self.codec, self.encode_workers)

    def run_shard(self, name: str, windows: list[dict]) -> dict:
        return asdict(self.start_shard(name, [PackedWindow(**w) for w in windows]).result())

    def close(self) -> None:
        self.pipeline.close()
        self._thread.close()


def _visible_gpus() -> list[str]:
    import torch

    count = torch.cuda.device_count()
    visible = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if g.strip()]
    return visible[:count] if visible else [str(i) for i in range(count)]


# ---------------------------------------------------------------------------- Ray plumbing


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # "local": start this run's own cluster, never attach to one `ray start` left on
            # the machine (its GCS may be gone, and ray.init() then waits on it)
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise DumpError(f"cannot start or reach Ray ({address or 'local'}): {exc}") from None


def unwrap_task_error(exc: BaseException) -> BaseException:
    """The user-facing error inside a RayTaskError, if there is one."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, KdcacheError) else exc


@dataclass(frozen=True)
class EnginePlacement:
    """The Ray resources of one engine: one bundle, on one node."""

    gpus: float = 0  # GPUs of the engine's group (tensor x pipeline parallel); 0: a CPU engine;
    #                  a fraction only when asked for (--engines-per-gpu)
    cpus: float = 1.0

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": float(self.gpus)} if self.gpus else {})}


def engine_placement(engine_cfg: EngineConfig, engines_per_gpu: int = 1) -> EnginePlacement:
    """GPUs for the engine when the cluster has GPUs and the engine may use them."""
    import ray

    if ray.cluster_resources().get("GPU", 0) > 0 and engine_cfg.device != "cpu":
        group = engine_cfg.tensor_parallel * engine_cfg.pipeline_parallel
        return EnginePlacement(gpus=group if engines_per_gpu == 1 else 1 / engines_per_gpu)
    return EnginePlacement()


def check_capacity(placement: EnginePlacement, workers: int) -> None:
    """Refuse, before any engine starts, a request the cluster's nodes cannot hold."""
    import ray

    if not placement.gpus:
        return
    node_gpus = sorted((int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["Alive"]),
                       reverse=True)
    fits = sum(int(g / placement.gpus + 1e-9) for g in node_gpus)
    if fits < workers:
        raise DumpError(
            f"--workers {workers} engines of {placement.gpus} GPU(s) each (tensor x pipeline "
            f"parallel) need {workers} groups of {placement.gpus} GPUs, each group on one node; "
            f"this cluster's nodes have {node_gpus} GPUs, room for {fits}. Lower --workers or "
            "the parallel sizes, or add nodes")


def start_engine_actor(engine_name: str, engine_cfg: EngineConfig, placement: EnginePlacement,
                       env: dict[str, str], group=None, max_concurrency: int = SHARDS_PER_ACTOR):
    """(actor, placement group): a DumpWorker in a placement group of its own (STRICT_PACK),
    or in `group` (a dead engine's, reused by its replacement)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if group is None:
        group = placement_group([placement.bundle()], strategy="STRICT_PACK")
    ready, _ = ray.wait([group.ready()], timeout=30)
    if not ready:  # busy cluster (or an autoscaler adding nodes): say so, then keep waiting
        print(f"kdcache dump: waiting for Ray to place an engine ({placement.bundle()})",
              file=sys.stderr, flush=True)
        ray.get(group.ready())
    # actors may run with another working directory: give them an absolute model path
    cfg = replace(engine_cfg, model=os.path.abspath(engine_cfg.model))
    actor = ray.remote(DumpWorker).options(
        max_restarts=0, max_concurrency=max_concurrency, num_cpus=placement.cpus,
        num_gpus=placement.gpus, runtime_env={"env_vars": env},
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True)).remote(engine_name, asdict(cfg))
    return actor, group


class ActorPool:
    """`workers` DumpWorker actors (or the ones given); replaces dead ones.

    Actors the pool started (all of them, or only the replacements of given ones) are the ones
    `shutdown` stops, with their placement groups; given actors are left running for their owner.
    """

    def __init__(self, engine_name: str, engine_cfg: EngineConfig, workers: int,
                 ray_address: str | None, out: str, header, table: bytes | None,
                 actors=None, engines_per_gpu: int = 1,
                 encode_workers: int | None = None) -> None:
        import ray

        self.placement = engine_placement(engine_cfg, engines_per_gpu)
        if actors is None:
            check_capacity(self.placement, workers)
        cpus = ray.cluster_resources().get("CPU", 1)
        threads = max(1, int(min(cpus, os.cpu_count() or 1) // max(1, workers)))
        self.env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                    "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(engine_cfg.kv_cache_gib))))}
        # vLLM-CPU pins its threads, by default all to the same core(s) in every process; on a
        # local CPU cluster give each actor its own slice of this machine's cores instead.
        self.core_slices: list[str] | None = None
        if not self.placement.gpus and ray_address is None and hasattr(os, "sched_getaffinity"):
            cores = sorted(os.sched_getaffinity(0))
            w = max(1, workers)
            self.core_slices = [",".join(map(str, cores[i * len(cores) // w:
                                                         (i + 1) * len(cores) // w] or cores))
                                for i in range(w)]
        self.slot_of: dict[Any, int] = {}
        self.groups: dict[int, Any] = {}  # slot -> the placement group the pool created
        self.engine_name, self.engine_cfg = engine_name, engine_cfg
        self.configure_args = (out, asdict(header), table, encode_workers)
        self.actors = list(actors) if actors is not None else \
            [self._new(i) for i in range(workers)]
        self.owned: list = [] if actors is not None else list(self.actors)
        # configure every actor; surfaces engine start-up errors before any shard is sent
        try:
            self.pids = self._configure(self.actors)
            self.placements = ray.get([a.where.remote() for a in self.actors])
        except BaseException:
            self.shutdown()
            raise

    def _new(self, slot: int):
        env = dict(self.env)
        if self.core_slices is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.core_slices[slot % len(self.core_slices)]
            env["OMP_NUM_THREADS"] = str(len(env["VLLM_CPU_OMP_THREADS_BIND"].split(",")))
        # a replacement reuses its slot's placement group (and so keeps its GPUs)
        actor, self.groups[slot] = start_engine_actor(self.engine_name, self.engine_cfg,
                                                      self.placement, env,
                                                      group=self.groups.get(slot))
        self.slot_of[actor] = slot
        return actor

    def _configure(self, actors) -> list[int]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get([a.configure.remote(*self.configure_args) for a in actors])
        except RayTaskError as exc:
            raise unwrap_task_error(exc) from None
        except RayActorError as exc:  # the engine's constructor failed (or the actor died)
            lines = [ln.strip() for ln in str(exc).splitlines() if "Error:" in ln]
            raise DumpError("a teacher engine actor failed to start: "
                            + (lines[-1] if lines else str(exc).splitlines()[0])) from None

    def set_table(self, header, table: bytes | None) -> None:
        """Hand every actor (and future replacements) the dataset's codec table."""
        self.configure_args = (self.configure_args[0], asdict(header), table,
                               self.configure_args[3])
        self.pids = self._configure(self.actors)

    def replace(self, dead):
        import ray

        try:
            ray.kill(dead, no_restart=True)
        except Exception:
            pass
        self.actors.remove(dead)
        slot = self.slot_of.get(dead, len(self.slot_of))
        fresh = self._new(slot)
        self.owned.append(fresh)
        self.actors.append(fresh)
        self.pids = [p for p in self.pids] + self._configure([fresh])
        return fresh

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.owned:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        for group in self.groups.values():
            try:
                remove_placement_group(group)
            except Exception:
                pass
        self.groups = {}
        self.actors = []
