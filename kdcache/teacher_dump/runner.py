"""The dump runner: corpus -> packed windows -> shards, on Ray actors, resumable.

`run_dump` is four steps, each a function here:
1. Plan (`_plan_run`). Fingerprint the teacher and corpus, make one packing pass to fix the shard
   layout (shard s = windows [s*W, (s+1)*W), W = windows_per_shard) and write `plan.json`
   atomically, before any shard. An existing plan must match (else ConfigMismatchError); its
   layout must be reproduced exactly by this run's packing (else the corpus changed under us).
2. Resume (`_resume_state`). Shards recorded in `progress/` (or in a finished manifest) are done;
   the rest are to do. Resume is "run it again".
3. Schedule (`_schedule`; `_schedule_in_process` without Ray: one engine in this process, the
   same shard pipeline, shards in order, each packed on a thread while the engine computes the
   one before). Start (or join) Ray; `workers` actors each hold one engine
   (workers.py). The driver packs windows again, streaming, and hands each not-yet-complete
   shard to an idle actor; at most one shard per actor is in flight, so the driver's memory is
   bounded by `workers` shards whatever the corpus size. The actor computes targets and writes
   the shard itself (atomic: temp + fsync + rename) and returns its manifest entry; the driver
   records it in `progress/<shard>.json`. An actor that dies (killed, OOM) fails its task with
   RayActorError: the shard goes back to the queue for the next idle actor, and a replacement
   actor is started, up to `max_retries` times per shard. Errors from the data
   (TargetValidationError, StorageError such as a full disk) are not retried: they stop the run
   with their own message, after in-flight shards have finished.
4. Finish (`_finish`). Write the dataset card and manifest (last), drop `progress/`, and return
   the summary (printed as one screen or one JSON line).
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from kdcache.errors import ConfigMismatchError, KdcacheError
from kdcache.formats import storage
from kdcache.formats.codecs import default_codec
from kdcache.formats.manifest import DatasetHeader, ShardInfo
from kdcache.formats.packing import MODES
from kdcache.formats.writer import (begin_dataset, dataset_finished, finish_dataset,
                                    read_finished_manifest, read_stored_codec_table,
                                    remove_stale_temporaries, shard_name, shard_name_of)
from kdcache.teacher_dump.chat import resolve_policy
from kdcache.teacher_dump.corpus import CorpusStats, corpus_fingerprint, iter_documents
from kdcache.teacher_dump.pack import PackedWindow, PackStats, TeacherTokenizer, pack_documents
from kdcache.teacher_dump.plan import (PROGRESS_DIR, DumpConfig, DumpError, Plan, check_against,
                                       check_teacher_limits, completed_shards, discard_dataset,
                                       load_plan, mark_done, teacher_fingerprint, write_plan)
from kdcache.teacher_dump.pipeline import ahead
from kdcache.teacher_dump.workers import (SHARDS_PER_ACTOR, ActorPool, DumpWorker, init_ray,
                                          unwrap_task_error, window_to_dict)

__all__ = ["DumpError", "format_summary", "iter_shards", "make_plan", "run_dump"]


# ---------------------------------------------------------------------------- packing passes


def iter_shards(cfg: DumpConfig, tokenizer: TeacherTokenizer, corpus_stats: CorpusStats,
                pack_stats: PackStats) -> Iterator[tuple[str, list[PackedWindow]]]:
    """(shard name, its windows) in order; the layout is a pure function of the config."""
    docs = iter_documents(cfg.corpus, corpus_stats)
    batch: list[PackedWindow] = []
    index = 0
    for win in pack_documents(docs, tokenizer, cfg.pack, pack_stats):
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
        raise DumpError(f"{cfg.corpus.path}: the corpus yielded no documents to dump "
                        f"({corpus_stats.empty} empty, {corpus_stats.undecodable} undecodable, "
                        f"{pack_stats.dropped_over_long} over-long dropped)")
    return Plan(config=cfg.identity(), execution=cfg.execution_options(),
                corpus=corpus_fingerprint(cfg.corpus),
                teacher=teacher_fingerprint(cfg.teacher.model), shards=shards,
                packing_stats=pack_stats.as_dict(), corpus_stats=corpus_stats.as_dict())


# ---------------------------------------------------------------------------- header


def build_header(cfg: DumpConfig, plan: Plan, tokenizer: TeacherTokenizer):
    t, p = cfg.teacher, cfg.pack
    teacher = dict(plan.teacher)
    teacher.update(engine=cfg.engine, dtype=t.dtype,
                   vllm_path=t.vllm_path if cfg.engine == "vllm" else None)
    packing = {"window": p.window, "mode": t.mode, "bos_id": tokenizer.bos_id,
               "eos_id": tokenizer.eos_id, "seed": p.seed,
               "split_long_docs": p.split_long_docs, "shuffle_buffer": p.shuffle_buffer,
               "windows_per_shard": cfg.windows_per_shard, "policy": "next-fit whole documents",
               "positions": MODES[t.mode].positions,
               "targets": resolve_policy(p.targets, plan.packing_stats.get("chats", 0) > 0)}
    if t.draws:  # RS-KD: up to `draws` distinct ids per row, weights = counts / draws
        kind, k, params, temperature = "sampled", t.draws, {"draws": t.draws}, t.temperature
    else:
        kind, k, params, temperature = "topk", t.k, {}, 1.0
    codec = cfg.codec or default_codec(kind)
    return DatasetHeader(kind=kind, k=k, vocab_size=int(teacher["vocab_size"]),
                         packing=packing, codec=codec,
                         codec_params=params if codec == "qrank" else {}, teacher=teacher,
                         temperature=temperature,
                         extra={"corpus": plan.corpus, "made_by": "kdcache dump"})


# ---------------------------------------------------------------------------- run


@dataclass
class _RunState:
    """What the four steps of `run_dump` hand each other."""

    plan: Plan
    header: Any  # DatasetHeader
    table: bytes | None  # the codec's fitted table (None: not fitted yet / the codec has none)
    tokenizer: TeacherTokenizer
    done: dict[str, dict] = field(default_factory=dict)  # shard name -> ShardInfo dict
    todo: list[str] = field(default_factory=list)
    already_final: bool = False
    written: list[str] = field(default_factory=list)
    retries: int = 0
    actor_failures: int = 0
    engines: list[dict] = field(default_factory=list)  # where each engine ran (node, GPUs)


def run_dump(cfg: DumpConfig, *, actors: list | None = None,
             on_shard_done: Callable[[str, dict, ActorPool], None] | None = None,
             log: Callable[[str], None] = print, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) a dump; returns the summary dict (also stored in the manifest stats).

    `overwrite`: replace a dataset of another configuration in `cfg.out` (refused otherwise).

    `actors`: already started DumpWorker actors to use (they are configured for this run and
    left running); by default `cfg.execution.workers` actors are started and stopped here.
    `on_shard_done(name, info, pool)` is called after each shard is recorded (tests use it to
    interrupt runs and kill actors at chosen points).
    """
    t_start = time.perf_counter()
    state = _plan_run(cfg, overwrite)
    _resume_state(cfg, state)
    if state.todo and cfg.execution.in_process:
        _schedule_in_process(cfg, state, on_shard_done)
    elif state.todo:
        _schedule(cfg, state, actors, on_shard_done, log)
    return _finish(cfg, state, time.perf_counter() - t_start)


def _plan_run(cfg: DumpConfig, overwrite: bool = False) -> _RunState:
    """Refuse what cannot run, write (or check) plan.json, build the dataset header."""
    if cfg.teacher.mode == "document-global" and cfg.engine == "vllm":
        raise ConfigMismatchError("packing mode 'document-global' needs positions that do not "
                                  "start at 0 per document, which vLLM cannot take: use --engine hf")
    tokenizer = TeacherTokenizer(cfg.teacher.model, cfg.pack.bos_id, cfg.pack.eos_id)
    check_teacher_limits(cfg)
    fs, base = storage.resolve(cfg.out)
    storage.check_reachable(fs, base)  # a missing bucket or refused credentials: before any work
    existing = load_plan(cfg.out)
    if existing is None and dataset_finished(cfg.out) and not overwrite:
        raise ConfigMismatchError(f"{cfg.out}: holds a dataset that was not made by this dump "
                                  "(manifest.json but no plan.json); choose another --out, or "
                                  "pass --overwrite to replace it")
    plan = make_plan(cfg, tokenizer)
    if existing is not None or dataset_finished(cfg.out):
        try:
            if existing is None:
                raise ConfigMismatchError(f"{cfg.out}: holds a dataset not made by this dump")
            check_against(existing, plan, where=storage.join(base, "plan.json"))
            if existing.shards != plan.shards:
                raise ConfigMismatchError(
                    f"{cfg.out}: the corpus packs into different shards than the plan recorded "
                    "(the corpus changed); use a new --out, or pass --overwrite to start over")
        except ConfigMismatchError:
            if not overwrite:
                raise
            discard_dataset(cfg.out)  # everything is validated: replace the old dataset
            existing = None
    write_plan(cfg.out, plan)  # refresh execution settings; config is unchanged
    header = build_header(cfg, plan, tokenizer)
    # The codec's table (qrank's id ranking) is fitted on the teacher's top-k of the first window
    # once the engines are up; a resumed run reuses the table its earlier shards were coded with.
    table = read_stored_codec_table(cfg.out)
    remove_stale_temporaries(cfg.out)
    return _RunState(plan=plan, header=header, table=table, tokenizer=tokenizer,
                     already_final=existing is not None and dataset_finished(cfg.out))


def _resume_state(cfg: DumpConfig, state: _RunState) -> None:
    """Which shards are done (progress records, or a finished manifest) and which are to do."""
    state.done = completed_shards(cfg.out)
    if state.already_final:  # a finished dump: nothing to redo
        finished = read_finished_manifest(cfg.out)
        state.done.update({shard_name_of(s["name"]): s for s in finished["shards"]})
    state.todo = [s["name"] for s in state.plan.shards if s["name"] not in state.done]
    state.already_final = state.already_final and not state.todo


def _fit_codec_table(cfg: DumpConfig, state: _RunState,
                     score: Callable[[dict], tuple]) -> None:
    """Score the first window (`score(window dict)` -> its (ids, logprobs, valid)), fit the
    codec's table on its top-k ids and store it before any shard is coded with it."""
    first = next(iter_shards(cfg, state.tokenizer, CorpusStats(), PackStats()), None)
    if first is None or not first[1]:
        return
    ids, _, valid = score(window_to_dict(first[1][0]))
    codec = begin_dataset(cfg.out, state.header, sample_ids=np.asarray(ids)[np.asarray(valid)])
    state.table = codec.table


def _schedule(cfg: DumpConfig, state: _RunState, actors: list | None,
              on_shard_done: Callable[[str, dict, ActorPool], None] | None,
              log: Callable[[str], None]) -> None:
    """Hand the shards to do to idle actors, record each finished one, retry dead actors'."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    x = cfg.execution
    init_ray(x.ray_address)
    pool = ActorPool(cfg.engine, cfg.teacher, x.workers, x.ray_address, cfg.out, state.header,
                     state.table, actors,
                     engines_per_gpu=x.engines_per_gpu,
                     encode_workers=x.encode_workers)  # waits for the engines to start
    state.engines = pool.placements
    if state.table is None:
        _fit_codec_table(cfg, state,
                         lambda w: ray.get(pool.actors[0].topk.remote([w]))[0])
        if state.table is not None:
            pool.set_table(state.header, state.table)
    total_tokens = sum(s["tokens"] for s in state.plan.shards)
    bar = _progress(cfg, total_tokens,
                    sum(s["tokens"] for s in state.plan.shards if s["name"] in state.done))
    done = state.done
    shard_iter = ((n, w) for n, w in iter_shards(cfg, state.tokenizer, CorpusStats(),
                                                 PackStats()) if n not in done)
    retry_queue: deque[tuple[str, list[dict], int]] = deque()
    # each actor takes SHARDS_PER_ACTOR shards at once: its engine computes the next shard
    # while the previous one is encoded and written
    idle = deque(a for _ in range(SHARDS_PER_ACTOR) for a in pool.actors)
    replaced: set = set()  # dead actors already replaced (their other shards just go back)
    pending: dict[Any, tuple[str, list[dict], int, Any]] = {}
    tokens_of = {s["name"]: s["tokens"] for s in state.plan.shards}
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
                    name, wins, attempt = nxt[0], [window_to_dict(w) for w in nxt[1]], 0
                actor = idle.popleft()
                pending[actor.run_shard.remote(name, wins)] = (name, wins, attempt, actor)
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            name, wins, attempt, actor = pending.pop(ready[0])
            try:
                info = ray.get(ready[0])
            except RayActorError as exc:
                state.actor_failures += 1
                if attempt + 1 > x.max_retries:
                    raise DumpError(f"{name}: failed {attempt + 1} times (actor died: "
                                    f"{str(exc).splitlines()[0]}); giving up") from None
                state.retries += 1
                retry_queue.append((name, wins, attempt + 1))
                if actor in replaced:
                    log(f"kdcache dump: actor died while writing {name}; retrying it "
                        f"(attempt {attempt + 2})")
                    continue
                log(f"kdcache dump: actor died while writing {name}; retrying it "
                    f"(attempt {attempt + 2}) and starting a replacement actor")
                replaced.add(actor)
                idle = deque(a for a in idle if a is not actor)
                idle.extend([pool.replace(actor)] * SHARDS_PER_ACTOR)
                continue
            except RayTaskError as exc:
                raise unwrap_task_error(exc) from None
            mark_done(cfg.out, name, info)
            done[name] = info
            state.written.append(name)
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


def _schedule_in_process(cfg: DumpConfig, state: _RunState,
                         on_shard_done: Callable[[str, dict, Any], None] | None) -> None:
    """The shards to do, in order, on one engine in this process (no Ray): each shard is
    written while the engine computes the next, and recorded once it is in place."""
    worker = DumpWorker(cfg.engine, asdict(cfg.teacher))
    encode_workers = cfg.execution.encode_workers
    pending: deque[tuple[str, Any]] = deque()  # (shard, future of its ShardInfo), in order
    bar = None

    def record(name: str, future) -> None:
        info = asdict(future.result())
        mark_done(cfg.out, name, info)
        state.done[name] = info
        state.written.append(name)
        if bar is not None:
            bar.update(tokens_of[name])
        if on_shard_done is not None:
            on_shard_done(name, info, worker)

    try:
        worker.configure(cfg.out, asdict(state.header), state.table, encode_workers)
        state.engines = [worker.where_local()]
        if state.table is None:
            _fit_codec_table(cfg, state, lambda w: worker.topk([w])[0])
            if state.table is not None:
                worker.configure(cfg.out, asdict(state.header), state.table, encode_workers)
        tokens_of = {s["name"]: s["tokens"] for s in state.plan.shards}
        bar = _progress(cfg, sum(tokens_of.values()),
                        sum(tokens_of[n] for n in state.done))
        # the next shard is packed while the engine computes this one
        with closing(ahead(iter_shards(cfg, state.tokenizer, CorpusStats(),
                                       PackStats()))) as shards:
            for name, wins in shards:
                if name in state.done:
                    continue
                pending.append((name, worker.start_shard(name, wins)))
                while pending and pending[0][1].done():
                    record(*pending.popleft())
        while pending:
            record(*pending.popleft())
    except BaseException:
        # stop cleanly: shards already computed finish writing and are recorded for the resume
        for name, future in pending:
            try:
                info = asdict(future.result())
                mark_done(cfg.out, name, info)
                state.done[name] = info
            except BaseException:
                pass
        raise
    finally:
        if bar is not None:
            bar.close()
        worker.close()


def _finish(cfg: DumpConfig, state: _RunState, seconds: float) -> dict[str, Any]:
    """Write the manifest and card (unless the dataset was already final); the summary."""
    plan, t = state.plan, cfg.teacher
    shards = [ShardInfo.from_dict(state.done[s["name"]]) for s in plan.shards]
    total_tokens = sum(s["tokens"] for s in plan.shards)
    written_tokens = sum(s["tokens"] for s in plan.shards if s["name"] in state.written)
    summary = {
        "out": cfg.out, "engine": cfg.engine, "mode": t.mode, "k": t.k, "window": cfg.pack.window,
        "shards": len(plan.shards), "shards_written": len(state.written),
        "shards_skipped": len(plan.shards) - len(state.written),
        "windows": sum(s.windows for s in shards),
        "tokens": total_tokens, "tokens_written": written_tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(written_tokens / seconds, 1) if seconds else 0.0,
        "actor_failures": state.actor_failures, "retries": state.retries,
        "corpus": plan.corpus_stats, "packing": plan.packing_stats,
        "already_complete": state.already_final,
        "engines": state.engines, "tensor_parallel": t.tensor_parallel,
        "pipeline_parallel": t.pipeline_parallel,
    }
    if not state.already_final:
        stats = {"corpus": plan.corpus_stats, "packing": plan.packing_stats,
                 "dump": {k: summary[k] for k in ("engine", "shards", "windows", "tokens")}}
        manifest = finish_dataset(cfg.out, state.header, shards, table=state.table, stats=stats)
        summary["bytes"] = manifest["totals"]["bytes"]
        summary["target_bytes_per_token"] = manifest["totals"]["target_bytes_per_token"]
        fs, base = storage.resolve(cfg.out)
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
    if not cfg.execution.progress:
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
        *([f"  chat: {p.get('chats', 0)} conversations packed, {c.get('bad_chat', 0)} malformed, "
           f"{p.get('rejected_chats', 0)} rejected by the template or target policy, "
           f"{p.get('dropped_long_chats', 0)} longer than the window (dropped); targets on "
           f"{p.get('target_tokens', 0):,} tokens"]
          if p.get("chats") or c.get("bad_chat") or p.get("rejected_chats") else []),
        f"  faults: {s['actor_failures']} actor failures, {s['retries']} shard retries",
    ]
    if s.get("engines"):
        nodes = {e["node_id"] for e in s["engines"]}
        gpus = sum(len(e["gpu_ids"]) for e in s["engines"])
        lines.insert(2, f"  engines {len(s['engines'])} on {len(nodes)} node(s), {gpus} GPUs "
                        f"(tensor parallel {s['tensor_parallel']}, pipeline parallel "
                        f"{s['pipeline_parallel']})")
    if "target_bytes_per_token" in s:
        lines.append(f"  size: {s['bytes']:,} bytes, {s['target_bytes_per_token']:.1f} target "
                     "bytes per token")
    if s.get("already_complete"):
        lines.append("  the dataset was already complete; nothing to do")
    return "\n".join(lines)

