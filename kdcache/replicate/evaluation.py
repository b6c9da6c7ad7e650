"""Evaluation of every model of the experiment, each result cached as JSON under DIR/eval/.

- needle: passkey prompts of exact lengths up to and past the training window (the same prompts
  for every model, so arms are compared on identical inputs), scored per sample with its needle
  distance;
- lm: held-out perplexity and KL to the teacher's stored targets on the long windows training
  never saw;
- probe: the teacher in every packing mode and dtype (how much of the teacher's output moves with
  position, and how much of that is rounding);
- diff: the phase-wise KD arm's stage 1 against stage 2 (which query dimensions moved).
"""

from __future__ import annotations

import os
from typing import Callable

from kdcache.evaluate.diff import diff_checkpoints
from kdcache.evaluate.lm import evaluate_lm
from kdcache.evaluate.needle import NeedleConfig, run_needle
from kdcache.evaluate.probe import ProbeConfig, run_probe
from kdcache.replicate.presets import Preset
from kdcache.replicate.store import cached_json


def needle_config(preset: Preset) -> dict:
    """The needle test every model takes (JSON: it also travels to task processes)."""
    return {"tasks": ["passkey"], "lengths": list(preset.needle_lengths),
            "depths": list(preset.needle_depths), "samples": preset.needle_samples,
            "max_new_tokens": 8, "engine": "hf", "dtype": preset.dtype,
            "device": preset.torch_device, "seed": 0}


def needle_record(model: str, config: dict) -> dict:
    """One model's passkey accuracy by needle distance, with every sample's score."""
    cfg = NeedleConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    entry = run_needle([model], cfg)["models"][0]["tasks"]["passkey"]
    return {"model": model, "accuracy": entry["accuracy"], "by_distance": entry["by_distance"],
            "samples": [{k: s[k] for k in ("length", "depth", "distance", "score")}
                        for s in entry["samples"]]}


def eval_models(teachers: dict[str, str], students: dict[str, list[dict]]) -> dict[str, str]:
    """Every model the evaluation scores: name -> HF directory (students: their last stage)."""
    models = {f"teacher-{k}": v for k, v in teachers.items()}
    for arm, runs in students.items():
        for r in runs:
            models[f"{arm}/seed{r['seed']}"] = r["stage2"]
    return models


def needle_path(out: str, name: str) -> str:
    return os.path.join(out, "eval", "needle-" + name.replace("/", "-") + ".json")


def lm_path(out: str, name: str) -> str:
    return os.path.join(out, "eval", "lm-" + name.replace("/", "-") + ".json")


def lm_args(model: str, data: str, holdout: int, preset: Preset) -> dict:
    """One model's held-out perplexity / KL job (JSON: it also travels to task processes)."""
    return {"model": model, "data": data, "holdout": holdout, "device": preset.torch_device}


def lm_record(model: str, data: str, holdout: int, device: str) -> dict:
    """One model's held-out perplexity and KL to the teacher on the last `holdout` windows."""
    result = evaluate_lm([model], data, last_windows=holdout, dtype="float32", device=device)
    entry = result.pop("models")[0]
    return {**result, "entry": entry}


def evaluate_all(out: str, preset: Preset, teachers: dict[str, str],
                 students: dict[str, list[dict]], data: dict[str, str], holdout: int, *,
                 log: Callable[[str], None] = print) -> dict:
    edir = os.path.join(out, "eval")
    os.makedirs(edir, exist_ok=True)
    device = preset.torch_device
    models = eval_models(teachers, students)

    def needle_of(name: str, path: str) -> dict:
        log(f"replicate: needle {name}")
        return needle_record(path, needle_config(preset))

    needle = {name: cached_json(needle_path(out, name), lambda n=name, p=path: needle_of(n, p))
              for name, path in models.items()}

    def lm_of(name: str, path: str) -> dict:
        log(f"replicate: held-out perplexity and KL to the teacher, {name}")
        return lm_record(**lm_args(path, data["long-main"], holdout, preset))

    lm_names = [n for n in models if not n.startswith("teacher-")] + ["teacher-main"]
    lm_records = [cached_json(lm_path(out, name), lambda n=name: lm_of(n, models[n]))
                  for name in lm_names]
    lm_result = {k: v for k, v in lm_records[0].items() if k != "entry"}
    lm_result["models"] = [r["entry"] for r in lm_records]

    def probe() -> dict:
        log("replicate: probe on the teacher")
        cfg = ProbeConfig(block_tokens=preset.probe_block, repeats=preset.probe_repeats,
                          dtypes=("float32", "bfloat16"), device=device, capture_queries=False)
        summary, _ = run_probe(teachers["main"], cfg)
        return {"model": teachers["main"], "window": cfg.window,
                "runs": [{k: r[k] for k in ("mode", "dtype", "kl_mean", "kl_max")}
                         for r in summary["runs"]]}

    probe_result = cached_json(os.path.join(edir, "probe.json"), probe)

    def diff() -> dict | None:
        runs = students.get("kd-phasewise")
        if not runs:
            return None
        log("replicate: checkpoint diff of the phase-wise arm (stage 1 vs stage 2)")
        cfg = ProbeConfig(block_tokens=preset.probe_block, repeats=preset.probe_repeats,
                          dtypes=("float32",), device=device)
        result = diff_checkpoints(runs[0]["stage1"], runs[0]["stage2"], cfg)
        return summarize_diff(result)

    diff_result = cached_json(os.path.join(edir, "diff.json"), diff)
    return {"needle": needle, "lm": lm_result, "probe": probe_result, "diff": diff_result,
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
