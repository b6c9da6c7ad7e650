"""`kdcache eval needle`: retrieval accuracy by context length, needle depth and needle distance.

For every model (each with its own tokenizer) and task: build lengths x depths x samples prompts
(needle_tasks.py), decode greedily (generate.py), score, and aggregate

- by (length, depth): the heat map;
- by needle distance (tokens between the queried needle and the question, the paper's Figure 4
  x-axis), in power-of-two bins [2^k, 2^(k+1)) (bin 0 holds distances 0 and 1): one curve per
  model on shared axes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

from kdcache.evaluate.generate import make_generator, resolve_engine
from kdcache.evaluate.models import EvalError, check_model_dir, unique_labels
from kdcache.model_config import max_positions, read_config
from kdcache.evaluate.needle_tasks import TASKS, VALUE_TYPES, build_samples, score
from kdcache.evaluate.report import save_figure

log = logging.getLogger("kdcache.eval")

DEFAULT_MAX_NEW_TOKENS = {"passkey": 16, "niah_single": 32, "niah_multikey": 32,
                          "niah_multivalue": 128, "niah_multiquery": 128}


@dataclass
class NeedleConfig:
    tasks: tuple[str, ...] = ("passkey",)
    value_type: str = "numbers"
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = tuple(i / 10 for i in range(11))
    samples: int = 4  # per (length, depth) cell
    max_new_tokens: int | None = None  # None: DEFAULT_MAX_NEW_TOKENS[task]
    engine: str = "auto"
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for task in self.tasks:
            if task not in TASKS:
                raise EvalError(f"unknown needle task {task!r}; choose from {', '.join(TASKS)}")
        if self.value_type not in VALUE_TYPES:
            raise EvalError(f"unknown value type {self.value_type!r}; choose from "
                            f"{', '.join(VALUE_TYPES)}")
        if not self.lengths or min(self.lengths) < 16:
            raise EvalError(f"lengths must be >= 16 tokens, got {self.lengths}")
        if any(not 0 <= d <= 1 for d in self.depths):
            raise EvalError(f"depths must be fractions in [0, 1], got {self.depths}")
        if self.samples < 1:
            raise EvalError("--samples must be >= 1")


def distance_bin(distance: int) -> int:
    """Bin k holds distances in [2^k, 2^(k+1)); distances 0 and 1 fall in bin 0."""
    return max(0, int(math.floor(math.log2(max(1, distance)))))


def bin_label(k: int) -> str:
    lo, hi = 2 ** k if k else 0, 2 ** (k + 1)
    short = lambda v: f"{v // 1024}k" if v >= 1024 and v % 1024 == 0 else str(v)  # noqa: E731
    return f"{short(lo)}-{short(hi)}"


def read_haystack(path: str) -> list[str]:
    """Documents from a .txt file, a .jsonl file (field "text") or a folder of .txt files."""
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".txt")]
             if os.path.isdir(path) else [path])
    if not files:
        raise EvalError(f"{path}: no .txt files for the haystack")
    texts = []
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                if file.endswith(".jsonl"):
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                texts.append(str(json.loads(line)["text"]))
                            except (json.JSONDecodeError, KeyError, TypeError):
                                raise EvalError(f"{file}:{n}: not a JSON object with a "
                                                "\"text\" field") from None
                else:
                    texts.append(f.read())
        except (OSError, UnicodeDecodeError) as exc:
            raise EvalError(f"{file}: cannot read haystack text: {exc}") from None
    if not any(t.strip() for t in texts):
        raise EvalError(f"{path}: haystack documents are empty")
    return texts


def aggregate(records: list[dict], lengths: Sequence[int], depths: Sequence[float]) -> dict:
    cells: dict[tuple, list[float]] = defaultdict(list)
    bins: dict[int, list[tuple[float, int]]] = defaultdict(list)
    by_length: dict[int, list[float]] = defaultdict(list)
    for r in records:
        cells[(r["length"], r["depth"])].append(r["score"])
        bins[distance_bin(r["distance"])].append((r["score"], r["distance"]))
        by_length[r["length"]].append(r["score"])
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "accuracy": mean([r["score"] for r in records]),
        "by_length": {str(L): mean(by_length[L]) for L in lengths},
        "heatmap": [[mean(cells[(L, d)]) for L in lengths] for d in depths],
        "by_distance": [{"bin": k, "label": bin_label(k), "count": len(v),
                         "accuracy": mean([s for s, _ in v]),
                         "mean_distance": mean([d for _, d in v])}
                        for k, v in sorted(bins.items())],
    }


def run_needle(model_paths: Sequence[str], cfg: NeedleConfig, haystack: str | None = None,
               show_progress: bool = False) -> dict:
    from tqdm.auto import tqdm

    for path in model_paths:
        check_model_dir(path)
    engine = resolve_engine(cfg.engine)
    texts = read_haystack(haystack) if haystack else None
    per_model = len(cfg.lengths) * len(cfg.depths) * cfg.samples * len(cfg.tasks)
    bar = tqdm(total=per_model * len(model_paths), unit="prompt", desc="needle",
               disable=not show_progress)
    result: dict[str, Any] = {
        "config": {**vars(cfg), "engine": engine, "haystack": haystack or "noise"},
        "models": [],
    }
    labels = unique_labels(model_paths)
    result["warnings"] = []
    for path, label in zip(model_paths, labels):
        max_new = max(cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[t] for t in cfg.tasks)
        limit = max_positions(read_config(path))
        if limit is not None and max(cfg.lengths) + max_new > limit[1]:
            # allowed (length extrapolation is a fair question), never silent
            message = (f"{path}: prompts of up to {max(cfg.lengths)} tokens (+{max_new} "
                       f"generated) exceed the model's {limit[1]} positions ({limit[0]}); "
                       "those cells measure extrapolation past its context")
            log.warning("%s", message)
            result["warnings"].append(message)
        gen = make_generator(engine, path, dtype=cfg.dtype, device=cfg.device,
                             batch_size=cfg.batch_size, max_len=max(cfg.lengths) + max_new)
        entry = {"model": path, "name": label, "tasks": {}}
        try:
            prompts = {task: build_samples(gen.tokenizer, task, cfg.value_type, cfg.lengths,
                                           cfg.depths, cfg.samples, seed=cfg.seed,
                                           haystack_texts=texts)
                       for task in cfg.tasks}  # all built first: a bad length fails fast
            for task, samples in prompts.items():
                bar.set_postfix_str(f"{label} {task}")
                outputs = gen.generate([s.input_ids for s in samples],
                                       cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task],
                                       progress=bar.update)
                records = [{"length": s.length, "depth": s.depth, "distance": s.distance,
                            "answers": s.answers, "output": out,
                            "score": score(task, out, s.answers)}
                           for s, out in zip(samples, outputs)]
                entry["tasks"][task] = {**aggregate(records, cfg.lengths, cfg.depths),
                                        "samples": records}
        finally:
            gen.close()
        result["models"].append(entry)
    bar.close()
    return result


def plot_needle(result: dict, task: str, out_dir: str) -> list[str]:
    """Heat map (depth x length) per model, and accuracy vs needle distance, one curve each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cfg = result["config"]
    models = result["models"]
    lengths, depths = cfg["lengths"], cfg["depths"]
    paths = []
    cols = min(3, len(models))
    rows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.axis("off")
    for ax, m in zip(axes.flat, models):
        data = m["tasks"][task]
        image = ax.imshow(data["heatmap"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto",
                          origin="upper")
        ax.set_xticks(range(len(lengths)), [_k(L) for L in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{m['name']}: {data['accuracy']:.0%}", fontsize=9)
        if len(lengths) * len(depths) <= 80:  # small grids: write the numbers in the cells
            for (r, c), v in np.ndenumerate(np.asarray(data["heatmap"], dtype=float)):
                if not math.isnan(v):
                    ax.text(c, r, f"{v:.0%}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=axes, fraction=0.03, pad=0.03).set_label("accuracy")
    fig.suptitle(f"{task}: accuracy by length and depth", fontsize=10)
    paths.append(save_figure(fig, os.path.join(out_dir, f"needle_{task}_heatmap.png")))

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for m in models:
        bins = m["tasks"][task]["by_distance"]
        ax.plot([2 ** b["bin"] for b in bins], [b["accuracy"] for b in bins], "o-",
                label=m["name"])
    ticks = sorted({b["bin"] for m in models for b in m["tasks"][task]["by_distance"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks([2 ** k for k in ticks], [bin_label(k) for k in ticks], fontsize=7,
                  rotation=30)
    ax.minorticks_off()
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("needle distance: tokens between needle and question (bin)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{task}: accuracy by needle distance", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, os.path.join(out_dir, f"needle_{task}_distance.png")))
    return paths


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)

