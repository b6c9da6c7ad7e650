"""Forward hooks that record what the probe looks at, for chosen token rows only.

Recorded per forward (each a float32 CPU tensor [batch, rows, width]):
- `embeddings`: output of the input embedding;
- `layer.{i}`: output of decoder layer i (the residual stream after attention + MLP);
- `q_pre.{i}` / `q_post.{i}`: layer i's query states right before and right after RoPE, heads
  concatenated ([rows, heads * head_dim]).

Queries are caught by wrapping the rotary function that the attention module calls
(`apply_rotary_pos_emb` in Llama / Mistral / Qwen / Gemma style modules, `apply_rotary_emb` in
Llama 4) inside the module's own namespace while the recorder is active; a pre-hook on each
attention module tells the wrapper which layer is calling. "Pre-RoPE" is therefore exactly the
tensor the model rotates (after any q-norm that comes before RoPE, as in Qwen 3 / Gemma 3) and
"post-RoPE" exactly the rotated result. Llama 4's NoPE layers never call the rotary function, so
they have no query record. Only the selected rows are copied out, so memory stays bounded by
rows x width per layer however long the input is.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

from kdcache.evaluate.models import UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "llama4", "llama4_text", "mistral", "mixtral", "qwen2",
                         "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3",
                         "gemma3_text")
_ROTARY_FUNCTIONS = {"apply_rotary_pos_emb": 2, "apply_rotary_emb": 1}  # name -> sequence axis


def find_decoder(model: Any) -> Any:
    """The base model (embeddings + `.layers` + final norm) of a transformers causal LM.
    `get_decoder()` returns it for most models; Llama 4's text model returns itself, so also try
    the usual attribute names."""
    candidates = [model.get_decoder() if hasattr(model, "get_decoder") else None,
                  getattr(model, "model", None), getattr(model, "language_model", None)]
    inner = getattr(model, "model", None)
    candidates.append(getattr(inner, "language_model", None))
    for candidate in candidates:
        if candidate is not None and candidate is not model and hasattr(candidate, "layers"):
            return candidate
    raise UnsupportedModelError(
        f"{type(model).__name__}: no decoder with a `.layers` list; the probe supports "
        f"Llama-family causal LMs ({', '.join(SUPPORTED_MODEL_TYPES)})")


def decoder_layers(model: Any) -> tuple[Any, list[Any]]:
    """(decoder, its list of layers) for a transformers causal LM."""
    decoder = find_decoder(model)
    return decoder, list(decoder.layers)


class ActivationRecorder:
    """Context manager: while active, forwards of `model` record the selected rows."""

    def __init__(self, model: Any, capture_queries: bool = True) -> None:
        self.model = model
        self.decoder, self.layers = decoder_layers(model)
        self.capture_queries = capture_queries
        self.rows = None  # LongTensor [r]: positions along the sequence to keep
        self.records: dict[str, list] = defaultdict(list)
        self._handles: list[Any] = []
        self._patched: list[tuple[Any, str, Any]] = []
        self._current_layer: int | None = None
        if capture_queries:
            self._rotary_targets = self._find_rotary_functions()

    def _find_rotary_functions(self) -> list[tuple[Any, str]]:
        model_type = getattr(self.model.config, "model_type", "?")
        targets = []
        for layer in self.layers:
            attn = getattr(layer, "self_attn", None)
            module = sys.modules.get(type(attn).__module__) if attn is not None else None
            for name in _ROTARY_FUNCTIONS:
                if module is not None and callable(getattr(module, name, None)):
                    if (module, name) not in targets:
                        targets.append((module, name))
                    break
        if model_type not in SUPPORTED_MODEL_TYPES or not targets:
            raise UnsupportedModelError(
                f"model type {model_type!r} ({type(self.model).__name__}): query capture supports "
                f"Llama-family attention modules that call apply_rotary_pos_emb / "
                f"apply_rotary_emb (model types: {', '.join(SUPPORTED_MODEL_TYPES)}); run with "
                "--no-queries to probe only embeddings, layer outputs and log-probs")
        return targets

    def select(self, rows) -> None:
        self.rows = rows

    def _keep(self, key: str, tensor, seq_axis: int = 1) -> None:
        import torch

        picked = tensor.detach().index_select(seq_axis, self.rows.to(tensor.device))
        if seq_axis != 1:  # [B, H, r, hd] -> [B, r, H*hd]
            picked = picked.transpose(1, 2)
        picked = picked.reshape(picked.shape[0], picked.shape[1], -1)
        self.records[key].append(picked.to(torch.float32).cpu())

    def __enter__(self) -> "ActivationRecorder":
        embed = self.model.get_input_embeddings()
        self._handles.append(embed.register_forward_hook(
            lambda _m, _i, out: self._keep("embeddings", out)))
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._layer_hook(index)))
            attn = getattr(layer, "self_attn", None)
            if self.capture_queries and attn is not None:
                self._handles.append(attn.register_forward_pre_hook(self._enter_attn(index)))
                self._handles.append(attn.register_forward_hook(self._leave_attn))
        if self.capture_queries:
            for module, name in self._rotary_targets:
                original = getattr(module, name)
                self._patched.append((module, name, original))
                setattr(module, name, self._wrap_rotary(original, _ROTARY_FUNCTIONS[name]))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, name, original in reversed(self._patched):
            setattr(module, name, original)
        self._patched.clear()

    def _layer_hook(self, index: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self._keep(f"layer.{index}", hidden)
        return hook

    def _enter_attn(self, index: int):
        def hook(_module, _inputs):
            self._current_layer = index
        return hook

    def _leave_attn(self, _module, _inputs, _output) -> None:
        self._current_layer = None

    def _wrap_rotary(self, original, seq_axis: int):
        def wrapped(q, k, *args, **kwargs):
            q_out, k_out = original(q, k, *args, **kwargs)
            if self._current_layer is not None and self.rows is not None:
                self._keep(f"q_pre.{self._current_layer}", q, seq_axis)
                self._keep(f"q_post.{self._current_layer}", q_out, seq_axis)
            return q_out, k_out
        return wrapped

    def pop(self) -> dict[str, Any]:
        """Everything recorded since the last pop, concatenated over forwards: [B_total, r, w]."""
        import torch

        out = {key: torch.cat(parts, dim=0) for key, parts in self.records.items()}
        self.records.clear()
        return out
