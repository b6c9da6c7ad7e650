"""Loading a Hugging Face causal LM directory for evaluation, with errors that name the problem.

Every eval/analysis command takes plain HF directories (config.json + weights + tokenizer files),
so a teacher, a student exported by the trainer, or any downloaded model work the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

from kdcache.errors import KdcacheError

DTYPES = ("float32", "bfloat16", "float16")


class EvalError(KdcacheError):
    """Bad input to an evaluation or analysis command (model directory, options, data)."""


class UnsupportedModelError(EvalError):
    """The model's architecture is not one whose internals the probe knows how to hook."""


@dataclass
class LoadedModel:
    path: str
    name: str  # a short label for plots and tables
    model: Any  # transformers PreTrainedModel, eval mode
    tokenizer: Any  # transformers tokenizer
    dtype: str

    @property
    def config(self) -> Any:
        return self.model.config


def check_model_dir(path: str) -> dict:
    """The directory's config.json as a dict; EvalError naming the path when it is not an HF dir."""
    if not os.path.isdir(path):
        if os.path.isfile(path):
            raise EvalError(f"{path}: is a file; expected a Hugging Face model directory "
                            "(config.json + weights + tokenizer). Export trainer checkpoints "
                            "to an HF directory first.")
        raise EvalError(f"{path}: no such model directory")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise EvalError(f"{config_path}: missing; {path} is not a Hugging Face model directory")
    try:
        with open(config_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalError(f"{config_path}: cannot be read as JSON: {exc}") from None


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise EvalError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return getattr(torch, name)


def model_label(path: str) -> str:
    """A short name for plots and tables: the directory's name, or "stage/hf" for the trainer's
    exports (every stage exports to a folder named hf)."""
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) >= 2 and parts[-1] == "hf":
        return f"{parts[-2]}/hf"
    return parts[-1] or path


def unique_labels(paths: Sequence[str]) -> list[str]:
    """One distinct short name per model: `model_label`, lengthened with parent folders (up to
    the whole path) until no two runs share one (three runs/sN/s1/hf are not all "s1/hf")."""
    labels = [model_label(p) for p in paths]
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    depth = 2
    while len(set(labels)) < len(labels) and depth <= max(len(x) for x in parts):
        depth += 1
        counts = {label: labels.count(label) for label in labels}
        labels = [os.path.join(*x[-depth:]) if counts[label] > 1 else label
                  for label, x in zip(labels, parts)]
    return labels if len(set(labels)) == len(labels) else list(paths)


def load_model(path: str, dtype: str = "float32", device: str = "cpu",
               need_tokenizer: bool = True) -> LoadedModel:
    """AutoModelForCausalLM + AutoTokenizer from `path`, eval mode, SDPA attention."""
    check_model_dir(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype),
                                                     attn_implementation="sdpa")
    except (OSError, ValueError, KeyError) as exc:
        raise EvalError(f"{path}: cannot load as a causal LM: {exc}") from None
    model.to(device).eval()
    tokenizer = None
    if need_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as exc:
            raise EvalError(f"{path}: has no usable tokenizer (tokenizer.json / "
                            f"tokenizer_config.json): {exc}") from None
    return LoadedModel(path=path, name=model_label(path), model=model, tokenizer=tokenizer,
                       dtype=dtype)


def rope_theta(config: Any) -> float | None:
    """The RoPE base from a transformers config (v4 `rope_theta` or v5 `rope_parameters`)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        if "rope_theta" in params:
            return float(params["rope_theta"])
        for sub in params.values():  # per-layer-type parameters (e.g. Gemma 3)
            if isinstance(sub, dict) and "rope_theta" in sub:
                return float(sub["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None else None


def head_dim(config: Any) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def special_ids(tokenizer: Any, path: str) -> tuple[int, int]:
    """(BOS, EOS) ids; EvalError when the tokenizer lacks one."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise EvalError(f"{path}: tokenizer has no {'BOS' if bos is None else 'EOS'} token; the "
                        "probe's blocks are BOS + content + EOS")
    return int(bos), int(eos)
