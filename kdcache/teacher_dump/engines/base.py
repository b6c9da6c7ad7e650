"""The teacher engine protocol and the top-k extraction every engine shares.

An engine turns packed windows into per-row targets: for a window of n tokens, `ids` int32 [n, k]
and `logprobs` float32 [n, k], row i being the teacher's k most likely next tokens after token i
with their log-probabilities normalised over the full vocabulary at temperature 1, sorted
descending; rows without a target (`default_valid` False) hold -1 / -inf.

`chunked_topk` is the unavoidable work on top of the backbone: for rows h_i of the final hidden
states (after the last norm) and the teacher's `LogitHead` (lm_head weight W [V, d], plus the
bias, logit scale or soft-cap its architecture applies),

    z_i = head(h_i) (= W h_i for a Llama),   lse_i = log sum_v exp(z_iv),   top-k of z_i,   logprob_iv = z_iv - lse_i,

computed `chunk_rows` rows at a time so that only a [chunk_rows, V] block of fp32 logits ever
exists (never an [n, V] log-softmax).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.formats.packing import default_valid, request_segments
from kdcache.teacher_dump.pack import PackedWindow


class EngineError(KdcacheError):
    """The teacher cannot be run as asked (unsupported mode, model, or configuration)."""


@dataclass
class WindowTargets:
    """An engine's output for one window (numpy, ready for a WindowRecord)."""

    ids: np.ndarray  # int32 [n, k]
    logprobs: np.ndarray  # float32 [n, k]
    valid: np.ndarray  # bool [n]
    # sampled targets (EngineConfig.draws > 0): distinct drawn ids, -1 padded [n, draws], and
    # their weights (counts / draws, 0 padded)
    draw_ids: np.ndarray | None = None
    draw_weights: np.ndarray | None = None


@dataclass(frozen=True)
class EngineConfig:
    model: str  # HF model directory
    k: int = 64
    window: int = 131072  # longest request the engine must accept
    mode: str = "document"
    dtype: str = "float32"
    tensor_parallel: int = 1
    pipeline_parallel: int = 1  # vLLM: pipeline stages per engine (GPUs = tensor x pipeline)
    seed: int = 0
    chunk_elements: int | None = None  # logits per top-k block (None: by device, see chunked_topk)
    vllm_path: str = "pooler"  # "pooler" (top-k inside vLLM's worker) | "prompt-logprobs"
    device: str = "auto"  # HF engine: "cpu", "cuda" or "auto"
    kv_cache_gib: float = 1.0  # vLLM-CPU KV cache (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float | None = None  # vLLM's share of the GPU (None: vLLM's default)
    max_num_batched_tokens: int | None = None  # vLLM's tokens per step (None: vLLM's default)
    # a feeding engine's caps on its requests / prompt tokens in flight (None: from vLLM's
    # scheduler, see engines/vllm_feed.py)
    feed_max_requests: int | None = None
    feed_max_tokens: int | None = None
    draws: int = 0  # > 0: also this many samples per row from softmax(z / temperature)
    temperature: float = 1.0  # of the sampled draws

    def __post_init__(self) -> None:
        check_feed_caps(self.feed_max_requests, self.feed_max_tokens)


def check_feed_caps(max_requests: int | None, max_tokens: int | None) -> None:
    """Refuse a cap on a feed's requests or tokens in flight that is not None or a whole
    number of at least 1 (before an engine starts or anything is written)."""
    for name, value in (("feed_max_requests", max_requests), ("feed_max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise EngineError(f"{name} must be a whole number of at least 1 (or None: from "
                              f"vLLM's scheduler), got {value!r}")


class TeacherEngine(ABC):
    """One teacher model held in memory; `topk` is called once per window."""

    name: str = "base"
    modes: tuple[str, ...] = ()
    draws_supported: bool = False  # can it sample targets (EngineConfig.draws)?

    def __init__(self, cfg: EngineConfig) -> None:
        if cfg.mode not in self.modes:
            raise EngineError(f"engine {self.name!r} cannot serve packing mode {cfg.mode!r} "
                              f"(it serves {', '.join(self.modes)})")
        if cfg.draws and not self.draws_supported:
            raise EngineError(f"engine {self.name!r} cannot sample targets (draws); use "
                              "--engine vllm")
        self.cfg = cfg

    def reconfigure(self, *, k: int, mode: str, window: int) -> None:
        """Serve another k / packing mode without restarting (a started engine is expensive)."""
        if mode not in self.modes:
            raise EngineError(f"engine {self.name!r} cannot serve packing mode {mode!r}")
        if window > self.cfg.window:
            raise EngineError(f"window {window} exceeds the {self.cfg.window} this engine "
                              "was started for")
        self.cfg = replace(self.cfg, k=k, mode=mode)

    @abstractmethod
    def topk(self, windows: list[PackedWindow]) -> list[WindowTargets]:
        """Targets for each window, in order."""

    def compute(self, windows: list[PackedWindow]) -> Any:
        """The part of `topk` that needs the engine's thread (the model); `finish` turns its
        result into the targets on any thread, so that the dump's pipeline converts one group
        while the engine computes the next. Engines without such a split compute it all here."""
        return self.topk(windows)

    def finish(self, windows: list[PackedWindow], computed: Any) -> list[WindowTargets]:
        """The targets of `windows` from `compute`'s result (any thread)."""
        return computed

    # An engine that `feeds` can take the next group's requests before this group's results
    # are back, so that its scheduler never runs dry between groups (pipeline.computed_groups):
    # `collect(submit(windows))` is what `compute(windows)` returns. Engine's thread only.
    feeds: bool = False

    def submit(self, windows: list[PackedWindow]) -> Any:
        """Queue the windows' work without waiting for it."""
        raise EngineError(f"engine {self.name!r} cannot queue work ahead; call compute")

    def collect(self, submitted: Any) -> Any:
        """`compute`'s result for what `submit` queued (waits for it)."""
        raise EngineError(f"engine {self.name!r} cannot queue work ahead; call compute")

    def abandon(self) -> None:
        """Drop everything submitted and not collected (a caller that stopped mid-way)."""

    def limit_feed(self, max_requests: int | None = None, max_tokens: int | None = None) -> None:
        """Cap the requests / tokens that `submit` keeps queued (EngineConfig.feed_max_*)."""
        raise EngineError(f"engine {self.name!r} cannot queue work ahead")

    def feed_stats(self) -> dict[str, int]:
        """The feed's caps and the most it held at once ({} for an engine that never fed)."""
        return {}

    def close(self) -> None:
        """Release the model (engines hold large memory)."""


def segments_for_mode(win: PackedWindow, mode: str) -> list[tuple[int, int, int]]:
    """(start, end, first_position) of each separately run request of a window (the mode's
    meaning lives in `kdcache.formats.packing.request_segments`)."""
    return request_segments(win.n_tokens, win.doc_offsets, mode)


def needed_rows(win: PackedWindow, mode: str) -> np.ndarray:
    """bool [n]: the rows that get a teacher target. Row i predicts token i + 1."""
    valid = default_valid(win.n_tokens, win.doc_offsets, mode)
    if win.target_mask is not None:
        valid &= np.append(np.asarray(win.target_mask[1:], dtype=bool), False)
    return valid


def empty_targets(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -1, dtype=np.int32), np.full((n, k), -np.inf, dtype=np.float32)


def finish_targets(win: PackedWindow, mode: str, ids: np.ndarray,
                   logprobs: np.ndarray) -> WindowTargets:
    """Blank the rows that have no target (window end; document ends in document modes; rows
    whose next token is not a target token, e.g. a conversation's prompt)."""
    valid = needed_rows(win, mode)
    ids[~valid] = -1
    logprobs[~valid] = -np.inf
    return WindowTargets(ids=ids, logprobs=logprobs, valid=valid)


@dataclass
class LogitHead:
    """A teacher's hidden -> logits map: z = cap * tanh(((W h + b) * scale) / cap).

    Llama-style models have only W; Phi-2 style an lm_head bias b; Cohere a `logit_scale` and
    Granite a `logits_scaling` divisor (scale); Gemma 2/3 soft-cap with
    `final_logit_softcapping` (cap). Leaving any of them out stores another distribution.
    """

    weight: Any  # torch [V, d]
    bias: Any = None  # torch [V] or None
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_config(cls, weight, bias, config) -> "LogitHead":
        """The head of a transformers model config (its text config for multimodal ones)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        get = (lambda key: text.get(key)) if isinstance(text, dict) else \
            (lambda key: getattr(text, key, None))
        scale = float(get("logit_scale") or 1.0) / float(get("logits_scaling") or 1.0)
        return cls(weight=weight, bias=bias, scale=scale,
                   softcap=float(get("final_logit_softcapping") or 0.0) or None)

    def __call__(self, hidden):
        """fp32 logits [rows, V] of hidden [rows, d]; the only dense block."""
        z = hidden @ self.weight.T
        if self.bias is not None:
            z = z + self.bias
        z = z.float()
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = self.softcap * (z / self.softcap).tanh()
        return z


def chunked_topk(hidden, weight, k: int, *, chunk_elements: int | None = None, out_ids=None,
                 out_logprobs=None):
    """Top-k full-vocabulary log-probs of the logits `weight(hidden)`, a block of rows at a time.

    hidden: [n, d] torch tensor; weight: a LogitHead, or a [V, d] tensor (a plain lm_head, logits
    `hidden @ weight.T`). Returns torch (ids int32 [n, k], logprobs fp32
    [n, k]) or fills `out_ids` / `out_logprobs` (numpy views of the same shape) in place.
    chunk_elements: logits per block; default 2^23 on CPU (cache-sized), 2^28 on a GPU (about
    1,300 rows at V=202,048: blocks of a few dozen rows leave the GPU's matrix units mostly idle;
    docs/teacher_dump.md). On a GPU the results stay on the device until the end: one copy to
    the host, not one per block.
    """
    import torch

    head = weight if isinstance(weight, LogitHead) else LogitHead(weight)
    n = hidden.shape[0]
    vocab = head.weight.shape[0]
    on_gpu = hidden.device.type == "cuda"
    if chunk_elements is None:
        chunk_elements = 1 << 28 if on_gpu else 1 << 23
    rows = max(1, chunk_elements // vocab)
    if out_ids is None:
        out_ids = torch.empty((n, k), dtype=torch.int32)
        out_logprobs = torch.empty((n, k), dtype=torch.float32)
        to_out = lambda t: t  # noqa: E731
    else:
        to_out = torch.from_numpy
    ids_t, lp_t = to_out(out_ids), to_out(out_logprobs)
    dev_ids = torch.empty((n, k), dtype=torch.int32, device=hidden.device) if on_gpu else ids_t
    dev_lp = torch.empty((n, k), dtype=torch.float32, device=hidden.device) if on_gpu else lp_t
    with torch.inference_mode():
        for start in range(0, n, rows):
            h = hidden[start:start + rows]
            logits = head(h)  # [rows, V] fp32
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            vals, idx = torch.topk(logits, k, dim=-1, sorted=True)
            dev_lp[start:start + rows] = vals - lse
            dev_ids[start:start + rows] = idx.to(torch.int32)
        if on_gpu:
            lp_t.copy_(dev_lp)
            ids_t.copy_(dev_ids)
    return out_ids, out_logprobs
