"""Where the teacher runs: `DumpWorker` (one engine, writes whole shards), and its Ray plumbing.

`DumpWorker` is plain Python: the runner starts it as a Ray actor (`ActorPool`), benches and the
in-process path call it directly. It turns a shard's windows into a written shard
(`engine_records` + `write_shard`) and returns the shard's manifest entry.

`ActorPool` starts `workers` actors (or adopts ones given), configures them for a dataset
(which surfaces engine start-up errors before any shard is sent), and replaces dead ones.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from typing import Any, Iterator

from kdcache.errors import KdcacheError
from kdcache.teacher_dump.engines.base import EngineConfig
from kdcache.teacher_dump.pack import PackedWindow

ENGINE_CALL_TOKENS = 16384  # windows are sent to the engine in groups of about this many tokens


class DumpError(KdcacheError):
    """The dump could not complete (an actor kept dying, Ray unavailable, ...)."""


def engine_records(engine, windows: list[PackedWindow],
                   call_tokens: int = ENGINE_CALL_TOKENS) -> Iterator:
    """WindowRecords for `windows`, the engine called on groups of about `call_tokens` tokens,
    lazily: while the writer's threads encode one group, the engine computes the next."""
    from kdcache.formats.window import WindowRecord

    sampled = bool(getattr(engine.cfg, "draws", 0))  # a `sampled` dataset stores the draws

    def run(group: list[PackedWindow]):
        for w, t in zip(group, engine.topk(group)):
            ids, values = (t.draw_ids, t.draw_weights) if sampled else (t.ids, t.logprobs)
            yield WindowRecord(window_index=w.window_index, tokens=w.tokens,
                               doc_offsets=w.doc_offsets, valid=t.valid, ids=ids,
                               values=values, doc_ids=w.doc_ids, doc_pieces=w.doc_pieces)

    group: list[PackedWindow] = []
    for w in windows:
        group.append(w)
        if sum(g.n_tokens for g in group) >= call_tokens:
            yield from run(group)
            group = []
    if group:
        yield from run(group)


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
        from kdcache.teacher_dump.engines import make_engine

        self.engine = make_engine(engine_name, EngineConfig(**engine_cfg))
        self.out = self.header = self.codec = None

    def configure(self, out: str, header: dict, table: bytes | None) -> int:
        from kdcache.formats.manifest import DatasetHeader
        from kdcache.formats.writer import make_codec

        self.out = out
        self.header = DatasetHeader(**header)
        self.codec = make_codec(self.header, table)
        self.engine.reconfigure(k=self.header.k, mode=self.header.packing["mode"],
                                window=int(self.header.packing["window"]))
        return os.getpid()

    def topk(self, windows: list[dict]) -> list[tuple]:
        """Raw engine output (ids, logprobs, valid) per window; for tests and benches."""
        out = self.engine.topk([PackedWindow(**w) for w in windows])
        return [(t.ids, t.logprobs, t.valid) for t in out]

    def run_shard(self, name: str, windows: list[dict]) -> dict:
        from kdcache.formats.writer import write_shard

        wins = [PackedWindow(**w) for w in windows]
        info = write_shard(self.out, name, engine_records(self.engine, wins), self.header, self.codec)
        return asdict(info)

    def close(self) -> None:
        self.engine.close()


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


class ActorPool:
    """`workers` DumpWorker actors (or the ones given); replaces dead ones.

    Actors the pool started (all of them, or only the replacements of given ones) are the ones
    `shutdown` stops; given actors are left running for their owner.
    """

    def __init__(self, engine_name: str, engine_cfg: EngineConfig, workers: int,
                 ray_address: str | None, out: str, header, table: bytes | None,
                 actors=None) -> None:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = ray.cluster_resources().get("CPU", 1)
        threads = max(1, int(min(cpus, os.cpu_count() or 1) // max(1, workers)))
        self.options: dict[str, Any] = {"max_restarts": 0, "max_concurrency": 1, "num_cpus": 1}
        if gpus > 0 and engine_cfg.device != "cpu":
            self.options["num_gpus"] = engine_cfg.tensor_parallel
        self.env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                    "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(engine_cfg.kv_cache_gib))))}
        # vLLM-CPU pins its threads, by default all to the same core(s) in every process; on a
        # local CPU cluster give each actor its own slice of this machine's cores instead.
        self.core_slices: list[str] | None = None
        if gpus == 0 and ray_address is None and hasattr(os, "sched_getaffinity"):
            cores = sorted(os.sched_getaffinity(0))
            w = max(1, workers)
            self.core_slices = [",".join(map(str, cores[i * len(cores) // w:
                                                         (i + 1) * len(cores) // w] or cores))
                                for i in range(w)]
        self.slot_of: dict[Any, int] = {}
        self.remote_cls = ray.remote(DumpWorker)
        # actors may run with another working directory: give them an absolute model path
        self.engine_args = (engine_name, asdict(replace(engine_cfg,
                                                        model=os.path.abspath(engine_cfg.model))))
        self.configure_args = (out, asdict(header), table)
        self.actors = list(actors) if actors is not None else \
            [self._new(i) for i in range(workers)]
        self.owned: list = [] if actors is not None else list(self.actors)
        # configure every actor; surfaces engine start-up errors before any shard is sent
        try:
            self.pids = self._configure(self.actors)
        except BaseException:
            self.shutdown()
            raise

    def _new(self, slot: int):
        env = dict(self.env)
        if self.core_slices is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.core_slices[slot % len(self.core_slices)]
            env["OMP_NUM_THREADS"] = str(len(env["VLLM_CPU_OMP_THREADS_BIND"].split(",")))
        actor = self.remote_cls.options(**self.options, runtime_env={"env_vars": env}).remote(
            *self.engine_args)
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
        self.configure_args = (self.configure_args[0], asdict(header), table)
        self.pids = self._configure(self.actors)

    def replace(self, dead):
        import ray

        try:
            ray.kill(dead, no_restart=True)
        except Exception:
            pass
        self.actors.remove(dead)
        fresh = self._new(self.slot_of.get(dead, 0))
        self.owned.append(fresh)
        self.actors.append(fresh)
        self.pids = [p for p in self.pids] + self._configure([fresh])
        return fresh

    def shutdown(self) -> None:
        import ray

        for a in self.owned:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []
