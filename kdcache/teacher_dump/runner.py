"""The dump runner: corpus -> packed windows -> shards, on Ray actors, resumable.

Flow of `run_dump`:
1. Plan. Fingerprint the teacher and corpus, make one packing pass to fix the shard layout
   (shard s = windows [s*W, (s+1)*W), W = windows_per_shard) and write `plan.json` atomically,
   before any shard. An existing plan must match (else ConfigMismatchError); its layout must be
   reproduced exactly by this run's packing (else the corpus changed under us).
2. Run. Start (or join) Ray; create `workers` actors, each holding one engine (`DumpWorker`).
   The driver packs windows again, streaming, and hands each not-yet-complete shard to an idle
   actor; at most one shard per actor is in flight, so the driver's memory is bounded by
   `workers` shards whatever the corpus size. The actor computes targets and writes the shard
   itself (atomic: temp + fsync + rename) and returns its manifest entry; the driver records it
   in `progress/<shard>.json`. Shards already recorded are skipped: resume is "run it again".
3. Faults. An actor that dies (killed, OOM) fails its task with RayActorError: the shard goes back
   to the queue for the next idle actor, and a replacement actor is started, up to `max_retries`
   times per shard. Errors from the data (TargetValidationError, StorageError such as a full
   disk) are not retried: they stop the run with their own message.
4. Finish. Write the codec table, dataset card and manifest (last), drop `progress/`, and print a
   one-screen summary (or one JSON line).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import asdict
from typing import Any, Callable, Iterator

import numpy as np

from kdcache.errors import ConfigMismatchError, KdcacheError
from kdcache.formats import storage
from kdcache.teacher_dump.corpus import CorpusSpec, CorpusStats, corpus_fingerprint, iter_documents
from kdcache.teacher_dump.engines.base import EngineConfig
from kdcache.teacher_dump.pack import (PackConfig, PackedWindow, PackStats, TeacherTokenizer,
                                       pack_documents)
from kdcache.teacher_dump.plan import (PROGRESS_DIR, DumpConfig, Plan, check_against,
                                       completed_shards, load_plan, mark_done,
                                       teacher_fingerprint, write_plan)

ENGINE_CALL_TOKENS = 16384  # windows are sent to the engine in groups of about this many tokens


class DumpError(KdcacheError):
    """The dump could not complete (an actor kept dying, Ray unavailable, ...)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


# ---------------------------------------------------------------------------- packing passes


def _pack_config(cfg: DumpConfig) -> PackConfig:
    return PackConfig(window=cfg.window, seed=cfg.seed, split_long_docs=cfg.split_long_docs,
                      shuffle_buffer=cfg.shuffle_buffer, bos_id=cfg.bos_id, eos_id=cfg.eos_id)


def _corpus_spec(cfg: DumpConfig) -> CorpusSpec:
    return CorpusSpec(path=cfg.corpus, text_field=cfg.text_field,
                      builtin_documents=cfg.builtin_documents, builtin_seed=cfg.seed)


def iter_shards(cfg: DumpConfig, tokenizer: TeacherTokenizer, corpus_stats: CorpusStats,
                pack_stats: PackStats) -> Iterator[tuple[str, list[PackedWindow]]]:
    """(shard name, its windows) in order; the layout is a pure function of the config."""
    docs = iter_documents(_corpus_spec(cfg), corpus_stats)
    batch: list[PackedWindow] = []
    index = 0
    for win in pack_documents(docs, tokenizer, _pack_config(cfg), pack_stats):
        batch.append(win)
        if len(batch) == cfg.windows_per_shard:
            yield shard_name(index), batch
            batch, index = [], index + 1
    if batch:
        yield shard_name(index), batch


def make_plan(cfg: DumpConfig, tokenizer: TeacherTokenizer) -> Plan:
    corpus_stats, pack_stats = CorpusStats(), PackStats()
    shards = [{"name": name, "windows": len(wins), "tokens": int(sum(w.n_tokens for w in wins)),
               "first_window": wins[0].window_index}
              for name, wins in iter_shards(cfg, tokenizer, corpus_stats, pack_stats)]
    if not shards:
        raise DumpError(f"{cfg.corpus}: the corpus yielded no documents to dump "
                        f"({corpus_stats.empty} empty, {corpus_stats.undecodable} undecodable, "
                        f"{pack_stats.dropped_over_long} over-long dropped)")
    return Plan(config=cfg.identity(), execution=cfg.execution(),
                corpus=corpus_fingerprint(_corpus_spec(cfg)),
                teacher=teacher_fingerprint(cfg.model), shards=shards,
                packing_stats=pack_stats.as_dict(), corpus_stats=corpus_stats.as_dict())


# ---------------------------------------------------------------------------- header


def build_header(cfg: DumpConfig, plan: Plan, tokenizer: TeacherTokenizer):
    from kdcache.formats.codecs import default_codec
    from kdcache.formats.manifest import DatasetHeader

    teacher = dict(plan.teacher)
    teacher.update(engine=cfg.engine, dtype=cfg.dtype,
                   vllm_path=cfg.vllm_path if cfg.engine == "vllm" else None)
    packing = {"window": cfg.window, "mode": cfg.mode, "bos_id": tokenizer.bos_id,
               "eos_id": tokenizer.eos_id, "seed": cfg.seed,
               "split_long_docs": cfg.split_long_docs, "shuffle_buffer": cfg.shuffle_buffer,
               "windows_per_shard": cfg.windows_per_shard, "policy": "next-fit whole documents",
               "positions": "global" if cfg.mode in ("causal", "document-global") else "reset"}
    return DatasetHeader(kind="topk", k=cfg.k, vocab_size=int(teacher["vocab_size"]),
                         packing=packing, codec=cfg.codec or default_codec("topk"),
                         codec_params={}, teacher=teacher, temperature=1.0,
                         extra={"corpus": plan.corpus, "made_by": "kdcache dump"})


def engine_config(cfg: DumpConfig) -> EngineConfig:
    return EngineConfig(model=os.path.abspath(cfg.model), k=cfg.k, window=cfg.window,
                        mode=cfg.mode, dtype=cfg.dtype, tensor_parallel=cfg.tensor_parallel,
                        seed=cfg.seed, vllm_path=cfg.vllm_path, device=cfg.device,
                        kv_cache_gib=cfg.kv_cache_gib)


# ---------------------------------------------------------------------------- the actor


def engine_records(engine, windows: list[PackedWindow], call_tokens: int = ENGINE_CALL_TOKENS):
    """WindowRecords for `windows`, the engine called on groups of about `call_tokens` tokens,
    lazily: while the writer's threads encode one group, the engine computes the next."""
    from kdcache.formats.window import WindowRecord

    def run(group: list[PackedWindow]):
        for w, t in zip(group, engine.topk(group)):
            yield WindowRecord(window_index=w.window_index, tokens=w.tokens,
                               doc_offsets=w.doc_offsets, valid=t.valid, ids=t.ids,
                               values=t.logprobs, doc_ids=w.doc_ids, doc_pieces=w.doc_pieces)

    group: list[PackedWindow] = []
    for w in windows:
        group.append(w)
        if sum(g.n_tokens for g in group) >= call_tokens:
            yield from run(group)
            group = []
    if group:
        yield from run(group)


def _window_to_dict(w: PackedWindow) -> dict[str, Any]:
    return {"window_index": w.window_index, "tokens": w.tokens, "doc_offsets": w.doc_offsets,
            "doc_ids": w.doc_ids, "doc_pieces": w.doc_pieces}


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

    def pid(self) -> int:
        return os.getpid()

    def run_shard(self, name: str, windows: list[dict]) -> dict:
        from kdcache.formats.writer import write_shard

        wins = [PackedWindow(**w) for w in windows]
        info = write_shard(self.out, name, engine_records(self.engine, wins), self.header, self.codec)
        return asdict(info)

    def close(self) -> None:
        self.engine.close()


# ---------------------------------------------------------------------------- Ray plumbing


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise DumpError(f"cannot start or reach Ray ({address or 'local'}): {exc}") from None


class _ActorPool:
    """`workers` DumpWorker actors (or the ones given); replaces dead ones."""

    def __init__(self, cfg: DumpConfig, header, table: bytes | None, actors=None) -> None:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = ray.cluster_resources().get("CPU", 1)
        threads = max(1, int(min(cpus, os.cpu_count() or 1) // max(1, cfg.workers)))
        self.options: dict[str, Any] = {"max_restarts": 0, "max_concurrency": 1, "num_cpus": 1}
        if gpus > 0 and cfg.device != "cpu":
            self.options["num_gpus"] = cfg.tensor_parallel
        self.env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                    "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(cfg.kv_cache_gib))))}
        # vLLM-CPU pins its threads, by default all to the same core(s) in every process; on a
        # local CPU cluster give each actor its own slice of this machine's cores instead.
        self.core_slices: list[str] | None = None
        if gpus == 0 and cfg.ray_address is None and hasattr(os, "sched_getaffinity"):
            cores = sorted(os.sched_getaffinity(0))
            w = max(1, cfg.workers)
            self.core_slices = [",".join(map(str, cores[i * len(cores) // w:
                                                         (i + 1) * len(cores) // w] or cores))
                                for i in range(w)]
        self.slot_of: dict[Any, int] = {}
        self.remote_cls = ray.remote(DumpWorker)
        self.engine_args = (cfg.engine, asdict(engine_config(cfg)))
        self.configure_args = (cfg.out, asdict(header), table)
        self.owned = actors is None
        self.actors = list(actors) if actors is not None else \
            [self._new(i) for i in range(cfg.workers)]
        self.started = len(self.actors) if self.owned else 0
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
            raise _unwrap(exc) from None
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
        self.owned_extra = getattr(self, "owned_extra", []) + [fresh]
        self.actors.append(fresh)
        self.started += 1
        self.pids = [p for p in self.pids] + self._configure([fresh])
        return fresh

    def shutdown(self) -> None:
        import ray

        owned = self.actors if self.owned else getattr(self, "owned_extra", [])
        for a in owned:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []


# ---------------------------------------------------------------------------- run


def _fit_codec_table(cfg: DumpConfig, header, tokenizer: TeacherTokenizer,
                     pool: "_ActorPool") -> bytes | None:
    """Score the first window, fit the codec's table on its top-k ids, store it, hand it out."""
    import ray

    from kdcache.formats.writer import prepare_codec, write_codec_table

    first = next(iter_shards(cfg, tokenizer, CorpusStats(), PackStats()), None)
    if first is None or not first[1]:
        return None
    ids, _, valid = ray.get(pool.actors[0].topk.remote([_window_to_dict(first[1][0])]))[0]
    codec = prepare_codec(header, sample_ids=np.asarray(ids)[np.asarray(valid)])
    write_codec_table(cfg.out, codec)  # atomic, before any shard that uses it
    if codec.table is not None:
        pool.set_table(header, codec.table)
    return codec.table


def _unwrap(exc: BaseException) -> BaseException:
    """The user-facing error inside a RayTaskError, if there is one."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, KdcacheError) else exc


def run_dump(cfg: DumpConfig, *, actors: list | None = None,
             on_shard_done: Callable[[str, dict, "_ActorPool"], None] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) a dump; returns the summary dict (also stored in the manifest stats).

    `actors`: already started DumpWorker actors to use (they are configured for this run and
    left running); by default `cfg.workers` actors are started and stopped here.
    `on_shard_done(name, info, pool)` is called after each shard is recorded (tests use it to
    interrupt runs and kill actors at chosen points).
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from kdcache.formats.manifest import MANIFEST_NAME, SHARD_DIR, ShardInfo
    from kdcache.formats.writer import (codec_table_entry, finalize_dataset, make_codec,
                                        read_stored_codec_table)

    t_start = time.perf_counter()
    if cfg.mode == "document-global" and cfg.engine == "vllm":
        raise ConfigMismatchError("packing mode 'document-global' needs positions that do not "
                                  "start at 0 per document, which vLLM cannot take: use --engine hf")
    tokenizer = TeacherTokenizer(cfg.model, cfg.bos_id, cfg.eos_id)
    fs, base = storage.resolve(cfg.out)
    storage.check_reachable(fs, base)  # a missing bucket or refused credentials: before any work
    existing = load_plan(cfg.out)
    if existing is None and fs.exists(storage.join(base, MANIFEST_NAME)):
        raise ConfigMismatchError(f"{cfg.out}: holds a dataset that was not made by this dump "
                                  "(manifest.json but no plan.json); choose another --out")
    plan = make_plan(cfg, tokenizer)
    if existing is not None:
        check_against(existing, plan, where=storage.join(base, "plan.json"))
        if existing.shards != plan.shards:
            raise ConfigMismatchError(f"{cfg.out}: the corpus packs into different shards than "
                                      "the plan recorded (the corpus changed); use a new --out")
    write_plan(cfg.out, plan)  # refresh execution settings; config is unchanged
    header = build_header(cfg, plan, tokenizer)
    # The codec's table (qrank's id ranking) is fitted on the teacher's top-k of the first window
    # once the engines are up; a resumed run reuses the table its earlier shards were coded with.
    table = read_stored_codec_table(cfg.out)
    make_codec(header, table)  # completes header.codec_params with the codec's defaults
    storage.remove_stale_temporaries(fs, storage.join(base, SHARD_DIR))

    done = completed_shards(cfg.out)
    manifest_path = storage.join(base, MANIFEST_NAME)
    if existing is not None and fs.exists(manifest_path):  # a finished dump: nothing to redo
        from kdcache.formats.manifest import parse_manifest

        finished = parse_manifest(storage.read_bytes(fs, manifest_path), where=manifest_path)
        done.update({s["name"].rsplit("/", 1)[-1].removesuffix(".arrow"): s
                     for s in finished["shards"]})
    total_tokens = sum(s["tokens"] for s in plan.shards)
    skipped_tokens = sum(s["tokens"] for s in plan.shards if s["name"] in done)
    todo = [s["name"] for s in plan.shards if s["name"] not in done]
    already_final = fs.exists(storage.join(base, MANIFEST_NAME)) and not todo
    retries = actor_failures = 0
    written: list[str] = []
    pool = None
    if todo:
        _init_ray(cfg.ray_address)
        pool = _ActorPool(cfg, header, table, actors)  # waits for the engines to start
        if table is None:
            table = _fit_codec_table(cfg, header, tokenizer, pool)
        bar = _progress(cfg, total_tokens, skipped_tokens)
        corpus_stats, pack_stats = CorpusStats(), PackStats()
        shard_iter = ((n, w) for n, w in iter_shards(cfg, tokenizer, corpus_stats, pack_stats)
                      if n not in done)
        retry_queue: deque[tuple[str, list[dict], int]] = deque()
        idle = deque(pool.actors)
        pending: dict[Any, tuple[str, list[dict], int, Any]] = {}
        tokens_of = {s["name"]: s["tokens"] for s in plan.shards}
        exhausted = False
        try:
            while True:
                while idle and (retry_queue or not exhausted):
                    if retry_queue:
                        name, wins, attempt = retry_queue.popleft()
                    else:
                        nxt = next(shard_iter, None)
                        if nxt is None:
                            exhausted = True
                            break
                        name, wins, attempt = nxt[0], [_window_to_dict(w) for w in nxt[1]], 0
                    actor = idle.popleft()
                    pending[actor.run_shard.remote(name, wins)] = (name, wins, attempt, actor)
                if not pending:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1)
                name, wins, attempt, actor = pending.pop(ready[0])
                try:
                    info = ray.get(ready[0])
                except RayActorError as exc:
                    actor_failures += 1
                    if attempt + 1 > cfg.max_retries:
                        raise DumpError(f"{name}: failed {attempt + 1} times (actor died: "
                                        f"{str(exc).splitlines()[0]}); giving up") from None
                    retries += 1
                    log(f"kdcache dump: actor died while writing {name}; retrying it "
                        f"(attempt {attempt + 2}) and starting a replacement actor")
                    retry_queue.append((name, wins, attempt + 1))
                    idle.append(pool.replace(actor))
                    continue
                except RayTaskError as exc:
                    raise _unwrap(exc) from None
                mark_done(cfg.out, name, info)
                done[name] = info
                written.append(name)
                idle.append(actor)
                if bar is not None:
                    bar.update(tokens_of[name])
                if on_shard_done is not None:
                    on_shard_done(name, info, pool)
        except BaseException:
            # stop cleanly: let in-flight shards finish (and record them) so that nothing is
            # left half-written, whatever stopped us (a data error, a full disk, Ctrl-C)
            _drain(pending, cfg.out, done)
            raise
        finally:
            if bar is not None:
                bar.close()
            pool.shutdown()

    shards = [ShardInfo.from_dict(done[s["name"]]) for s in plan.shards]
    seconds = time.perf_counter() - t_start
    summary = {
        "out": cfg.out, "engine": cfg.engine, "mode": cfg.mode, "k": cfg.k, "window": cfg.window,
        "shards": len(plan.shards), "shards_written": len(written),
        "shards_skipped": len(plan.shards) - len(written), "windows": sum(s.windows for s in shards),
        "tokens": total_tokens, "tokens_written": total_tokens - skipped_tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round((total_tokens - skipped_tokens) / seconds, 1) if seconds else 0.0,
        "actor_failures": actor_failures, "retries": retries,
        "corpus": plan.corpus_stats, "packing": plan.packing_stats,
        "already_complete": already_final,
    }
    if not already_final:
        stats = {"corpus": plan.corpus_stats, "packing": plan.packing_stats,
                 "dump": {k: summary[k] for k in ("engine", "shards", "windows", "tokens")}}
        manifest = finalize_dataset(cfg.out, header, shards, stats=stats,
                                    table=codec_table_entry(table))
        summary["bytes"] = manifest["totals"]["bytes"]
        summary["target_bytes_per_token"] = manifest["totals"]["target_bytes_per_token"]
        try:
            fs.rm(storage.join(base, PROGRESS_DIR), recursive=True)
        except (OSError, KdcacheError):  # leftover records are harmless beside a manifest
            pass
    return summary


def _drain(pending: dict, out: str, done: dict, timeout_s: float = 120.0) -> None:
    """Before stopping on an error, let the other actors finish their shards: nothing is left
    half-written when we return, and shards that did complete are recorded for the resume."""
    import ray

    refs = list(pending)
    if not refs:
        return
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in ready:
        name = pending.pop(ref)[0]
        try:
            info = ray.get(ref)
        except Exception:
            continue
        try:
            mark_done(out, name, info)
            done[name] = info
        except KdcacheError:
            pass


def _progress(cfg: DumpConfig, total: int, initial: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, smoothing=0.1,
                desc="kdcache dump", dynamic_ncols=True)


def format_summary(s: dict[str, Any]) -> str:
    """The one-screen human summary printed at the end of a dump."""
    c, p = s["corpus"], s["packing"]
    lines = [
        f"kdcache dump: {s['out']}",
        f"  engine {s['engine']}, mode {s['mode']}, k={s['k']}, window={s['window']}",
        f"  shards {s['shards']} ({s['shards_written']} written now, {s['shards_skipped']} "
        f"already complete), windows {s['windows']}, tokens {s['tokens']:,}",
        f"  time {s['seconds']:.1f} s, {s['tokens_per_s']:,.0f} tok/s for tokens written now",
        f"  corpus: {c.get('documents', 0)} documents read, {c.get('empty', 0)} empty, "
        f"{c.get('undecodable', 0)} undecodable (skipped and counted)",
        f"  packing: {p.get('documents', 0)} documents packed, {p.get('over_long', 0)} over-long "
        f"({p.get('split', 0)} split into {p.get('pieces', 0)} pieces, "
        f"{p.get('dropped_over_long', 0)} dropped), fill {p.get('fill', 0):.1%}",
        f"  faults: {s['actor_failures']} actor failures, {s['retries']} shard retries",
    ]
    if "target_bytes_per_token" in s:
        lines.append(f"  size: {s['bytes']:,} bytes, {s['target_bytes_per_token']:.1f} target "
                     "bytes per token")
    if s.get("already_complete"):
        lines.append("  the dataset was already complete; nothing to do")
    return "\n".join(lines)

