"""Evaluation of every model of the experiment, each result cached as JSON under DIR/eval/.

- needle: passkey prompts of exact lengths up to and past the training window (the same prompts
  for every model, so arms are compared on identical inputs), scored per sample with its needle
  distance;
- lm: held-out perplexity and KL to the teacher's stored targets on long windows of documents
  training never saw;
- probe: the teacher in every packing mode and dtype (how much of the teacher's output moves with
  position, and how much of that is rounding);
- diff: the phase-wise KD arm's stage 1 against stage 2 (which query dimensions moved).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

from kdcache.errors import KdcacheError
from kdcache.evaluate.diff import diff_checkpoints
from kdcache.evaluate.lm import evaluate_lm
from kdcache.evaluate.needle import NeedleConfig, run_needle
from kdcache.evaluate.probe import ProbeConfig, run_probe
from kdcache.formats.manifest import MANIFEST_NAME
from kdcache.replicate.presets import Preset
from kdcache.replicate.store import cached_json
from kdcache.replicate.teacher import teacher_record


# passkey: the task the students' corpus and the teachers' curriculum hold (the findings);
# niah_single: RULER's single-needle wording, which no model trains on (is the retrieval general?)
NEEDLE_TASKS = ("passkey", "niah_single")


def needle_config(preset: Preset) -> dict:
    """The needle test every model takes (JSON: it also travels to task processes). 10 new
    tokens hold a 5-digit key or a 7-digit value, each digit a token."""
    return {"tasks": list(NEEDLE_TASKS), "lengths": list(preset.needle_lengths),
            "depths": list(preset.needle_depths), "samples": preset.needle_samples,
            "max_new_tokens": 10, "engine": "hf", "dtype": preset.dtype,
            "device": preset.torch_device, "seed": 0}


def needle_record(model: str, config: dict) -> dict:
    """One model's passkey accuracy by needle distance, with every sample's score; the other
    tasks' under "tasks" in the same shape."""
    cfg = NeedleConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    tasks = run_needle([model], cfg)["models"][0]["tasks"]

    def part(entry: dict) -> dict:
        return {"accuracy": entry["accuracy"], "by_distance": entry["by_distance"],
                "samples": [{k: s[k] for k in ("length", "depth", "distance", "score")}
                            for s in entry["samples"]]}

    return {"model": model, **part(tasks["passkey"]),
            "tasks": {task: part(entry) for task, entry in tasks.items() if task != "passkey"}}


def needle_path(out: str, name: str) -> str:
    return os.path.join(out, "eval", "needle-" + name.replace("/", "-") + ".json")


def lm_path(out: str, name: str) -> str:
    return os.path.join(out, "eval", "lm-" + name.replace("/", "-") + ".json")


EVAL_KINDS = ("needle", "lm", "probe", "diff")
STUDENT_BASE = "student-base"  # the students' start's label in the evaluation


@dataclass(frozen=True)
class EvalJob:
    """One independent piece of the evaluation: `eval_record(kind, args)` saved at `path`."""
    kind: str  # one of EVAL_KINDS
    name: str
    args: dict[str, Any]  # JSON: a job also runs as a task in a process of its own
    path: str
    model: str = ""  # the scored model's name for per-model jobs
    after: tuple[str, ...] = ()  # files that must exist first (a student's finished stage)


def teacher_jobs(out: str, preset: Preset, teachers: dict[str, str],
                 ready: dict[str, tuple[str, ...]], base: str | None = None) -> list[EvalJob]:
    """What needs only the teachers (each once the files in `ready[who]` exist): their needle
    tests and the probe (they run beside the dumps); the students' start's needle test
    (`base`, model label STUDENT_BASE) once it is trained."""
    jobs = [EvalJob("needle", f"needle-teacher-{who}",
                    {"model": path, "config": needle_config(preset)},
                    needle_path(out, f"teacher-{who}"), f"teacher-{who}", ready[who])
            for who, path in teachers.items()]
    if base is not None:
        jobs.append(EvalJob("needle", f"needle-{STUDENT_BASE}",
                            {"model": base, "config": needle_config(preset)},
                            needle_path(out, STUDENT_BASE), STUDENT_BASE,
                            (teacher_record(base),)))
    jobs.append(EvalJob("probe", "probe",
                        {"model": teachers["main"], **_probe_args(preset)},
                        os.path.join(out, "eval", "probe.json"), after=ready["main"]))
    return jobs


def student_jobs(out: str, preset: Preset, teachers: dict[str, str],
                 students: dict[str, list[dict]], heldout: dict[str, str],
                 ready: dict[str, tuple[str, ...]]) -> list[EvalJob]:
    """Each student's needle test and held-out LM metrics (each starts once its student is done,
    `run["done"]`), the main teacher's LM metrics on the same windows (`heldout`: the dump of
    the held-out documents, one per kind of document, whose manifests the LM jobs wait for
    too), the phase-wise arm's diff."""
    device = preset.torch_device
    written = tuple(os.path.join(path, MANIFEST_NAME) for path in heldout.values())
    jobs, lm = [], []
    for arm, runs in students.items():
        for r in runs:
            name = f"{arm}/seed{r['seed']}"
            after = (r["done"],)
            jobs.append(EvalJob("needle", "needle-" + name.replace("/", "-"),
                                {"model": r["stage2"], "config": needle_config(preset)},
                                needle_path(out, name), name, after))
            lm.append((name, r["stage2"], after))
    lm.append(("teacher-main", teachers["main"], ready["main"]))
    jobs += [EvalJob("lm", "lm-" + name.replace("/", "-"),
                     {"model": path, "data": heldout, "device": device},
                     lm_path(out, name), name, after + written)
             for name, path, after in lm]
    runs = students.get("kd-phasewise")
    if runs:
        jobs.append(EvalJob("diff", "diff", {"stage1": runs[0]["stage1"],
                                             "stage2": runs[0]["stage2"], **_probe_args(preset)},
                            os.path.join(out, "eval", "diff.json"), after=(runs[0]["done"],)))
    return jobs


def _probe_args(preset: Preset) -> dict:
    return {"block": preset.probe_block, "repeats": preset.probe_repeats,
            "device": preset.torch_device}


def lm_record(model: str, data: dict[str, str], device: str) -> dict:
    """Held-out perplexity and KL to the teacher over every dataset of `data` (one per kind of
    document), overall (means over all their rows) and by kind: a teacher can be right about
    prose and wrong about retrieval documents, and the overall mean hides which."""
    parts = {kind: evaluate_lm([model], path, dtype="float32", device=device)["models"][0]
             for kind, path in data.items()}
    rows = sum(p["rows"] for p in parts.values())
    if not rows:
        raise KdcacheError(f"{model}: the held-out datasets have no rows to score")
    ce = sum(p["cross_entropy"] * p["rows"] for p in parts.values()) / rows
    kl = sum(p["kl_to_teacher"] * p["rows"] for p in parts.values()) / rows
    entry = {"model": model, "name": next(iter(parts.values()))["name"], "rows": rows,
             "cross_entropy": ce, "perplexity": math.exp(ce), "kl_to_teacher": kl,
             "by_kind": {kind: {k: p[k] for k in ("rows", "cross_entropy", "perplexity",
                                                  "kl_to_teacher")}
                         for kind, p in parts.items()}}
    return {"data": data, "models": [entry]}


def eval_record(kind: str, args: dict[str, Any]) -> dict:
    """Compute one evaluation job's JSON record."""
    if kind == "needle":
        return needle_record(args["model"], args["config"])
    if kind == "lm":
        return lm_record(args["model"], args["data"], args["device"])
    if kind == "probe":
        cfg = ProbeConfig(block_tokens=args["block"], repeats=args["repeats"],
                          dtypes=("float32", "bfloat16"), device=args["device"],
                          capture_queries=False)
        summary, _ = run_probe(args["model"], cfg)
        return {"model": args["model"], "window": cfg.window,
                "runs": [{k: r[k] for k in ("mode", "dtype", "kl_mean", "kl_max")}
                         for r in summary["runs"]]}
    if kind == "diff":
        cfg = ProbeConfig(block_tokens=args["block"], repeats=args["repeats"],
                          dtypes=("float32",), device=args["device"])
        return summarize_diff(diff_checkpoints(args["stage1"], args["stage2"], cfg))
    raise KdcacheError(f"unknown evaluation kind {kind!r}")


def evaluate_all(jobs: list[EvalJob], preset: Preset, *,
                 log: Callable[[str], None] = print) -> dict:
    """The evaluation's records (each job's saved result; a missing one is computed here)."""
    def record(job: EvalJob) -> dict:
        def make() -> dict:
            log(f"replicate: {job.kind} {job.name}")
            return eval_record(job.kind, job.args)
        return cached_json(job.path, make)

    needle, lm_models, lm_result = {}, [], {}
    probe_result = diff_result = None
    for job in jobs:
        result = record(job)
        if job.kind == "needle":
            needle[job.model] = result
        elif job.kind == "lm":
            lm_result = {k: v for k, v in result.items() if k != "models"}
            lm_models += result["models"]
        elif job.kind == "probe":
            probe_result = result
        elif job.kind == "diff":
            diff_result = result
    return {"needle": needle, "lm": {**lm_result, "models": lm_models}, "probe": probe_result,
            "diff": diff_result,
            "needle_config": {"lengths": list(preset.needle_lengths),
                              "depths": list(preset.needle_depths),
                              "samples": preset.needle_samples}}


def summarize_diff(result: dict) -> dict:
    """Where the query change concentrates: share of the squared distance in the top eighth of
    RoPE pairs (by change), and how flat it is across positions (coefficient of variation)."""
    import numpy as np

    layers = {}
    for layer, entry in result["layers"].items():
        by_pair = np.asarray(entry["pre_by_pair"], dtype=np.float64)
        by_pos = np.asarray(entry["pre_by_position"], dtype=np.float64)
        sq = by_pair ** 2
        top = max(1, len(sq) // 8)
        order = np.argsort(sq)[::-1]
        layers[layer] = {
            "top_pairs": order[:top].tolist(),
            "top_eighth_share": float(sq[order[:top]].sum() / max(sq.sum(), 1e-30)),
            "position_cv": float(by_pos.std() / max(by_pos.mean(), 1e-30)),
            "by_pair": by_pair.tolist(), "by_position": by_pos.tolist()}
    return {"models": result["models"], "head_dim": result["head_dim"],
            "rope_theta": result["rope_theta"], "layers": layers}
