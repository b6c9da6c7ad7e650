"""Teacher targets computed inside vLLM's worker, from the model's own logits.

vLLM serves the checkpoint's own causal-LM class (`LlamaForCausalLM`, `Gemma2ForCausalLM`,
`PhiForCausalLM`, `GPT2LMHeadModel`, ...) subclassed here as a *pooling* model whose pooler is
`TopkPooler`. For the hidden states of every scheduled prompt token it calls the model's own
`compute_logits` (vLLM's `LogitsProcessor`: lm_head with its bias, tied or untied, logit scale,
final soft-capping, padded rows trimmed, a vocab-parallel head gathered under tensor
parallelism), a block of rows at a time, and keeps only

- the top-k ids and full-vocabulary log-probs (`z - logsumexp(z)`, fp32), and
- optionally `draws` samples per row from softmax(z / T) (random-sampling KD), as the distinct
  ids and their counts,

so that a [rows, V] fp32 block is the only dense tensor and only [n, 2k (+ 2 draws)] floats per
request leave the worker. Ids travel as float32, exact below 2^24 (checked).

How the class reaches every worker process (tensor parallel > 1 runs one per GPU): the engine
asks for architecture `KdcacheTopk_<Arch>` through `hf_overrides` and maps it to
`kdcache.teacher_dump.engines.vllm_topk:KdcacheTopk_<Arch>` through `model_class_overrides`,
which vLLM registers in each process that resolves the model; this module's `__getattr__`
builds the subclass from vLLM's own registry entry for `<Arch>`. Settings (max k, block size)
ride in the HF config (`kdcache_topk`), per-request k / draws / temperature / seed in
`PoolingParams.extra_kwargs`.
"""

from __future__ import annotations

import zlib
from typing import Any

PREFIX = "KdcacheTopk_"
CONFIG_KEY = "kdcache_topk"
MAX_EXACT_ID = 1 << 24  # float32 holds every integer below this exactly
_CLASSES: dict[str, type] = {}


def wrapped_architecture(arch: str) -> str:
    return PREFIX + arch


def class_override(arch: str) -> dict[str, str]:
    """`model_class_overrides` entry that serves `arch` through the top-k pooler."""
    name = wrapped_architecture(arch)
    return {name: f"{__name__}:{name}"}


def request_kwargs(k: int, draws: int = 0, temperature: float = 1.0, seed: int = 0) -> dict:
    """`PoolingParams.extra_kwargs` for one request."""
    return {"k": int(k), "draws": int(draws), "temperature": float(temperature),
            "seed": int(seed) & 0x7FFFFFFF}


def row_width(k: int, draws: int) -> int:
    """Floats per row of a request's result: k ids, k log-probs, then draws ids, draws counts."""
    return 2 * k + 2 * draws


def __getattr__(name: str):
    if not name.startswith(PREFIX):
        raise AttributeError(name)
    if name not in _CLASSES:
        _CLASSES[name] = _make_class(name[len(PREFIX):])
    return _CLASSES[name]


def _make_class(arch: str) -> type:
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces_base import VllmModelForPooling

    base = ModelRegistry._try_load_model_cls(arch)
    if base is None:
        raise AttributeError(f"vLLM has no model class for architecture {arch!r}")
    if not hasattr(base, "compute_logits"):
        raise AttributeError(f"vLLM's {base.__name__} has no compute_logits: not a causal LM")

    class TopkModel(base, VllmModelForPooling):  # type: ignore[valid-type,misc]
        is_pooling_model = True

        def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            settings = getattr(vllm_config.model_config.hf_config, CONFIG_KEY, None) or {}
            self.pooler = TopkPooler(self.compute_logits,
                                     vocab_size=vllm_config.model_config.get_vocab_size(),
                                     **settings)

    TopkModel.__name__ = TopkModel.__qualname__ = PREFIX + arch
    TopkModel.__module__ = __name__
    return TopkModel


def _pooler_base():
    from vllm.model_executor.layers.pooler.abstract import Pooler

    return Pooler


class TopkPooler(_pooler_base()):
    """Per-token top-k (and draws) from the model's logits; see the module docstring."""

    def __init__(self, compute_logits, vocab_size: int, max_k: int = 64, max_draws: int = 0,
                 block_elements: int | None = None) -> None:
        super().__init__()
        if vocab_size > MAX_EXACT_ID:
            raise ValueError(f"vocabulary of {vocab_size} ids: the pooler path carries ids as "
                             f"float32, exact only below {MAX_EXACT_ID}; use --vllm-path "
                             "prompt-logprobs")
        self._compute_logits = compute_logits  # a bound method: not registered as a submodule
        self.vocab_size = int(vocab_size)
        self.max_k = int(max_k)
        self.max_draws = int(max_draws)
        self.block_elements = block_elements

    def get_supported_tasks(self):
        return {"token_embed"}

    def forward(self, hidden_states, pooling_metadata):
        import torch

        cursor = pooling_metadata.get_pooling_cursor()
        counts = cursor.num_scheduled_tokens_cpu.tolist()
        finished = (cursor.prompt_lens_cpu == cursor.seq_lens_cpu).tolist()
        starts = (cursor.seq_lens_cpu - cursor.num_scheduled_tokens_cpu).tolist()
        # requests without extra_kwargs (vLLM's memory-profiling run) ask for the most this
        # engine serves, so that the profile counts the largest blocks
        settings = [_settings(p, self.max_k, self.max_draws)
                    for p in pooling_metadata.pooling_params]
        with torch.inference_mode():
            if any(s["draws"] for s in settings):
                # one generator per request chunk, blocks aligned to the request: the same
                # request scheduled the same way draws the same samples (resume is exact)
                outs, row = [], 0
                for s, n, first in zip(settings, counts, starts):
                    gen = torch.Generator(device=hidden_states.device)
                    gen.manual_seed(zlib.crc32(f"{s['seed']}:{first}".encode()))
                    outs.append(self._rows(hidden_states[row:row + n], s["k"], s["draws"],
                                           s["temperature"], gen))
                    row += n
            else:  # top-k only: blocks across requests (thousands of short documents batch)
                k = max(s["k"] for s in settings)
                both = self._rows(hidden_states, k, 0, 1.0, None)
                outs = [torch.cat([piece[:, :s["k"]], piece[:, k:k + s["k"]]], dim=1)
                        for piece, s in zip(torch.split(both, counts), settings)]
        states = getattr(pooling_metadata, "pooling_states", None)
        if states is None:
            return outs
        # chunked prefill: keep each unfinished request's compact rows until its last chunk
        result = []
        for state, out, done in zip(states, outs, finished):
            cache = state.hidden_states_cache
            if done and not cache:
                result.append(out)
                continue
            cache.append(out)
            if done:
                result.append(torch.cat(cache, dim=0))
                state.clean()
            else:
                result.append(None)
        return result

    def _rows(self, hidden, k: int, draws: int, temperature: float, gen):
        """float32 [n, row_width(k, draws)] for the rows `hidden`, one [rows, V] fp32 block of
        logits at a time: top-k ids and log-probs, then `draws` samples from softmax(z / T) as
        distinct ids (most drawn first, -1 padded) and their counts."""
        import torch

        n = hidden.shape[0]
        out = torch.zeros((n, row_width(k, draws)), dtype=torch.float32, device=hidden.device)
        out[:, :k] = -1.0
        out[:, k:2 * k] = float("-inf")
        out[:, 2 * k:2 * k + draws] = -1.0
        # the same blocks on every tensor-parallel rank: compute_logits gathers collectively
        on_gpu = hidden.device.type == "cuda"
        elements = self.block_elements or ((1 << 28) if on_gpu else (1 << 23))
        rows = max(1, elements // self.vocab_size)
        for start in range(0, n, rows):
            z = self._compute_logits(hidden[start:start + rows])
            if z is None:  # a rank that does not receive the gathered logits: vLLM drops its
                continue  # output and returns the driver rank's
            z = z.float()
            vocab = z.shape[-1]
            m = z.shape[0]
            block = out[start:start + m]
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            vals, idx = torch.topk(z, min(k, vocab), dim=-1, sorted=True)
            block[:, k:k + vals.shape[1]] = vals - lse
            block[:, :idx.shape[1]] = idx.float()
            if draws:
                probs = torch.softmax(z / temperature, dim=-1)
                sample = torch.multinomial(probs, draws, replacement=True, generator=gen)
                counts = probs.zero_().scatter_add_(1, sample, torch.ones_like(sample,
                                                                             dtype=probs.dtype))
                cnt, cid = torch.topk(counts, min(draws, vocab), dim=-1, sorted=True)
                block[:, 2 * k:2 * k + cid.shape[1]] = torch.where(cnt > 0, cid.float(), -1.0)
                block[:, 2 * k + draws:2 * k + draws + cnt.shape[1]] = cnt
        return out


def _settings(params, max_k: int, max_draws: int) -> dict[str, Any]:
    extra = (getattr(params, "extra_kwargs", None) or {}) if params is not None else {}
    return {"k": int(extra.get("k", max_k)), "draws": int(extra.get("draws", max_draws)),
            "temperature": float(extra.get("temperature", 1.0)),
            "seed": int(extra.get("seed", 0))}
