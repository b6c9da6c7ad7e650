"""`kdcache generate`: the teacher writes the responses (sequence-level KD), as a chat corpus.

Prompts are read like a corpus (JSONL / Parquet / `builtin-chat`; records with `messages`, a
`prompt`, or plain text, which becomes one user turn). A conversation that already ends with
assistant turns has them removed: the teacher answers the last user (or tool) turn again. Each
prompt is rendered with the teacher tokenizer's chat template and its generation prompt, then
sampled with vLLM (`temperature`, `top_p`, `max_tokens`, and a per-prompt seed, so a prompt's
response does not depend on which worker ran it). The output is a JSONL chat corpus: the
prompt's messages plus the teacher's assistant turn, ready for `kdcache dump` (whose default
`--targets auto` scores the assistant turns only).

Runs like the dump: prompts are cut into parts, parts go to Ray actors (one vLLM engine each), a
finished part is written atomically under `OUT.parts/`, and a re-run skips finished parts; a
re-run with other sampling settings, teacher or prompts is refused. When every part is in, the
parts are joined into OUT (atomically), `OUT.meta.json` records the settings and counts, and the
parts folder is removed. `--workers 1` without Ray runs the engine in this process.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

from kdcache.errors import ConfigMismatchError, KdcacheError
from kdcache.formats import storage
from kdcache.teacher_dump.chat import ChatError, Conversation, render_text
from kdcache.teacher_dump.corpus import CorpusSpec, CorpusStats, corpus_fingerprint, iter_documents
from kdcache.teacher_dump.workers import init_ray, unwrap_task_error
from kdcache.vllm_start import configure_vllm_env, start_llm, stop_llm

GENERATE_FORMAT = "kdcache-generate-plan"


class GenerateError(KdcacheError):
    """The generation could not run as asked."""


@dataclass(frozen=True)
class GenerateConfig:
    model: str
    prompts: str
    out: str
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    text_field: str = "text"
    builtin_documents: int = 400
    prompts_per_part: int = 256
    max_model_len: int = 4096
    dtype: str = "float32"
    # execution only
    workers: int = 1
    ray_address: str | None = None
    kv_cache_gib: float = 1.0
    progress: bool = True

    EXECUTION = ("out", "workers", "ray_address", "kv_cache_gib", "progress")

    def __post_init__(self) -> None:
        problems = []
        if not self.temperature >= 0:
            problems.append(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            problems.append(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.prompts_per_part < 1:
            problems.append(f"--prompts-per-part must be >= 1, got {self.prompts_per_part}")
        if self.workers < 1:
            problems.append(f"--workers must be >= 1, got {self.workers}")
        if self.max_model_len <= self.max_tokens:
            problems.append(f"--max-model-len ({self.max_model_len}) must exceed --max-tokens "
                            f"({self.max_tokens})")
        if problems:
            raise GenerateError("; ".join(problems))

    def identity(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in self.EXECUTION}
        d["model"] = os.path.abspath(self.model)
        return d


# ---------------------------------------------------------------------------- prompts


def prompt_conversation(doc: str | Conversation) -> tuple[Conversation, bool]:
    """The prompt part of a document, and whether trailing assistant turns were removed."""
    if isinstance(doc, str):
        return Conversation(messages=({"role": "user", "content": doc},)), False
    messages = list(doc.messages)
    removed = False
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
        removed = True
    if not messages:
        raise ChatError("the conversation has no turn before its assistant turns")
    return Conversation(messages=tuple(messages), tools=doc.tools), removed


def render_prompts(cfg: GenerateConfig, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Every usable prompt: index, token ids (generation prompt included), conversation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    if not getattr(tok, "chat_template", None):
        raise GenerateError(f"{cfg.model}: the tokenizer has no chat template; generation "
                            "renders prompts with it")
    corpus_stats = CorpusStats()
    spec = CorpusSpec(cfg.prompts, text_field=cfg.text_field,
                      builtin_documents=cfg.builtin_documents, builtin_seed=cfg.seed)
    out = []
    for doc_id, doc in iter_documents(spec, corpus_stats):
        try:
            conv, removed = prompt_conversation(doc)
            text = render_text(tok, conv, add_generation_prompt=True)
        except ChatError as exc:
            _count(stats, "rejected", f"prompt {doc_id}: {exc}")
            continue
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) + cfg.max_tokens > cfg.max_model_len:
            _count(stats, "too_long", f"prompt {doc_id}: {len(ids)} tokens + --max-tokens "
                                      f"{cfg.max_tokens} > --max-model-len {cfg.max_model_len}")
            continue
        stats["replaced_responses"] += removed
        out.append({"index": doc_id, "prompt_ids": ids, "conversation": conv.to_json()})
    stats["corpus"] = corpus_stats.as_dict()
    return out


def _count(stats: dict[str, Any], key: str, problem: str) -> None:
    stats[key] += 1
    if len(stats["problems"]) < 20:
        stats["problems"].append(problem)


# ---------------------------------------------------------------------------- the engine


class GenerateWorker:
    """One vLLM engine; samples the responses of a part and writes the part's JSONL. Runs as a
    Ray actor, or in-process."""

    def __init__(self, model: str, dtype: str, max_model_len: int, seed: int,
                 kv_cache_gib: float) -> None:
        configure_vllm_env(kv_cache_gib)
        from vllm.platforms import current_platform

        # vLLM-CPU rewinds a seeded request's generator when it splits a prompt across steps
        # (chunked prefill), which CPU generators cannot do ("CPU Generator does not use
        # offset"): schedule whole prompts there. CUDA generators rewind fine.
        whole_prompts = {"enable_chunked_prefill": False} if current_platform.is_cpu() else {}
        self.llm = start_llm(GenerateError, model=model, dtype=dtype, seed=seed,
                             max_model_len=max_model_len, enable_prefix_caching=False,
                             enforce_eager=True, disable_log_stats=True,
                             distributed_executor_backend="uni", **whole_prompts)
        self.tokenizer = self.llm.get_tokenizer()

    def sample(self, prompts: list[dict[str, Any]], params: dict[str, Any]) -> list[dict]:
        """Per prompt: the response text, its token count and why it stopped."""
        from vllm import SamplingParams

        sampling = [SamplingParams(temperature=params["temperature"], top_p=params["top_p"],
                                   max_tokens=params["max_tokens"],
                                   seed=params["seed"] + p["index"], skip_special_tokens=True)
                    for p in prompts]
        results = self.llm.generate([{"prompt_token_ids": p["prompt_ids"]} for p in prompts],
                                    sampling, use_tqdm=False)
        return [{"text": r.outputs[0].text, "tokens": len(r.outputs[0].token_ids),
                 "finish_reason": r.outputs[0].finish_reason} for r in results]

    def run_part(self, out_dir: str, name: str, prompts: list[dict[str, Any]],
                 params: dict[str, Any]) -> dict[str, Any]:
        lines = []
        tokens = 0
        for p, r in zip(prompts, self.sample(prompts, params)):
            record = dict(p["conversation"])
            record["messages"] = record["messages"] + [{"role": "assistant",
                                                        "content": r["text"]}]
            record["kdcache_generation"] = {"prompt_index": p["index"], "tokens": r["tokens"],
                                            "finish_reason": r["finish_reason"]}
            tokens += r["tokens"]
            lines.append(json.dumps(record, ensure_ascii=False))
        fs, base = storage.resolve(out_dir)
        storage.atomic_write_bytes(fs, storage.join(base, f"{name}.jsonl"),
                                   ("\n".join(lines) + "\n").encode())
        return {"name": name, "prompts": len(prompts), "tokens": tokens}

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        stop_llm(llm)


# ---------------------------------------------------------------------------- the run


def parts_dir(out: str) -> str:
    return out + ".parts"


def run_generate(cfg: GenerateConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate (or resume generating) the teacher's responses; returns the summary."""
    t0 = time.perf_counter()
    meta_path = cfg.out + ".meta.json"
    stats: dict[str, Any] = {"prompts": 0, "rejected": 0, "too_long": 0,
                             "replaced_responses": 0, "problems": []}
    prompts = render_prompts(cfg, stats)
    stats["prompts"] = len(prompts)
    if not prompts:
        raise GenerateError(f"{cfg.prompts}: no usable prompts ({stats['rejected']} rejected by "
                            f"the template, {stats['too_long']} too long)")
    plan = {"format": GENERATE_FORMAT, "config": cfg.identity(),
            "prompts": corpus_fingerprint(CorpusSpec(cfg.prompts, text_field=cfg.text_field,
                                                     builtin_documents=cfg.builtin_documents,
                                                     builtin_seed=cfg.seed))}
    fs, base = storage.resolve(cfg.out)
    mfs, mbase = storage.resolve(meta_path)
    if mfs.exists(mbase) and fs.exists(base):
        meta = json.loads(storage.read_bytes(mfs, mbase))
        if meta.get("plan") == plan:
            return {**meta["summary"], "already_complete": True}
        raise ConfigMismatchError(f"{cfg.out} exists and was generated with other settings; "
                                  "choose another --out (or delete it)")
    if fs.exists(base):
        raise ConfigMismatchError(f"{cfg.out} exists and was not written by kdcache generate; "
                                  "choose another --out")
    pdir = parts_dir(cfg.out)
    pfs, pbase = storage.resolve(pdir)
    plan_path = storage.join(pbase, "plan.json")
    if pfs.exists(plan_path):
        old = json.loads(storage.read_bytes(pfs, plan_path))
        if old != plan:
            diffs = [f"{k}: {old['config'].get(k)!r} -> {v!r}" for k, v in plan["config"].items()
                     if old.get("config", {}).get(k) != v]
            raise ConfigMismatchError(
                f"{pdir} holds an interrupted generation with other settings "
                f"({'; '.join(diffs) or 'the prompts changed'}); delete it or choose another --out")
    storage.atomic_write_bytes(pfs, plan_path, json.dumps(plan, indent=2).encode())
    n = cfg.prompts_per_part
    parts = {f"part-{i // n:05d}": prompts[i:i + n] for i in range(0, len(prompts), n)}
    done = {name for name in parts if pfs.exists(storage.join(pbase, f"{name}.jsonl"))}
    todo = [name for name in parts if name not in done]
    params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
              "seed": cfg.seed}
    results = _run_parts(cfg, pdir, {name: parts[name] for name in todo}, params, log)
    # join the parts in order into OUT, atomically, then record how it was made
    body = b"".join(storage.read_bytes(pfs, storage.join(pbase, f"{name}.jsonl"))
                    for name in parts)
    storage.atomic_write_bytes(fs, base, body)
    seconds = time.perf_counter() - t0
    new_tokens = sum(r["tokens"] for r in results)
    summary = {"out": cfg.out, "prompts": len(prompts), "parts": len(parts),
               "parts_generated": len(todo), "response_tokens_generated": new_tokens,
               "seconds": round(seconds, 2),
               "response_tokens_per_s": round(new_tokens / seconds, 1) if seconds else 0.0,
               "stats": stats, "sampling": params, "already_complete": False}
    storage.atomic_write_bytes(mfs, mbase, json.dumps({"plan": plan, "summary": summary},
                                                      indent=2).encode())
    pfs.rm(pbase, recursive=True)
    return summary


def _ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _run_parts(cfg: GenerateConfig, pdir: str, parts: dict[str, list], params: dict,
               log: Callable[[str], None]) -> list[dict]:
    if not parts:
        return []
    engine_args = (os.path.abspath(cfg.model), cfg.dtype, cfg.max_model_len, cfg.seed,
                   cfg.kv_cache_gib)
    bar = _progress(cfg, sum(len(p) for p in parts.values()))
    try:
        if cfg.workers == 1 and cfg.ray_address is None and not _ray_available():
            worker = GenerateWorker(*engine_args)
            try:
                return [_advance(bar, worker.run_part(pdir, name, ps, params))
                        for name, ps in parts.items()]
            finally:
                worker.close()
        return list(_run_on_ray(cfg, pdir, parts, params, engine_args, bar, log))
    finally:
        if bar is not None:
            bar.close()


def _advance(bar, result: dict) -> dict:
    if bar is not None:
        bar.update(result["prompts"])
    return result


def _run_on_ray(cfg: GenerateConfig, pdir: str, parts: dict[str, list], params: dict,
                engine_args: tuple, bar, log: Callable[[str], None]) -> Iterator[dict]:
    """One part in flight per actor; a part whose actor died goes to a fresh actor (3 tries)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    init_ray(cfg.ray_address)
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // cfg.workers)),
           "TOKENIZERS_PARALLELISM": "false"}
    options: dict[str, Any] = {"max_restarts": 0, "num_cpus": 1,
                               "runtime_env": {"env_vars": env}}
    if ray.cluster_resources().get("GPU", 0) > 0:
        options["num_gpus"] = 1
    remote = ray.remote(GenerateWorker).options(**options)
    actors = [remote.remote(*engine_args) for _ in range(min(cfg.workers, len(parts)))]
    queue = [(name, 0) for name in parts]
    pending: dict[Any, tuple[str, int, Any]] = {}
    idle = list(actors)
    try:
        while queue or pending:
            while idle and queue:
                name, attempt = queue.pop(0)
                actor = idle.pop()
                ref = actor.run_part.remote(pdir, name, parts[name], params)
                pending[ref] = (name, attempt, actor)
            ready, _ = ray.wait(list(pending), num_returns=1)
            name, attempt, actor = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError as exc:
                if attempt >= 2:
                    raise GenerateError(f"{name}: failed 3 times (actor died: "
                                        f"{str(exc).splitlines()[0]})") from None
                log(f"kdcache generate: actor died on {name}; retrying on a new actor")
                ray.kill(actor, no_restart=True)
                actors.remove(actor)
                fresh = remote.remote(*engine_args)
                actors.append(fresh)
                idle.append(fresh)
                queue.append((name, attempt + 1))
                continue
            except RayTaskError as exc:
                raise unwrap_task_error(exc) from None
            idle.append(actor)
            yield _advance(bar, result)
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # best effort at shutdown
                pass


def _progress(cfg: GenerateConfig, total: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="prompt", desc="kdcache generate", dynamic_ncols=True)


def format_summary(s: dict[str, Any]) -> str:
    st = s["stats"]
    lines = [f"kdcache generate: {s['out']}",
             f"  {s['prompts']} prompts in {s['parts']} parts ({s['parts_generated']} generated "
             f"now), {s['response_tokens_generated']:,} response tokens, "
             f"{s['response_tokens_per_s']:,.0f} tok/s",
             f"  sampling: temperature {s['sampling']['temperature']}, top-p "
             f"{s['sampling']['top_p']}, max tokens {s['sampling']['max_tokens']}, seed "
             f"{s['sampling']['seed']}",
             f"  prompts skipped: {st['rejected']} rejected by the template, {st['too_long']} "
             f"too long; {st['replaced_responses']} existing responses replaced"]
    if s.get("already_complete"):
        lines.append("  already complete; nothing to do")
    return "\n".join(lines)
