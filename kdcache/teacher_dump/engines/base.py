"""The teacher engine protocol and the top-k extraction every engine shares.

An engine turns packed windows into per-row targets: for a window of n tokens, `ids` int32 [n, k]
and `logprobs` float32 [n, k], row i being the teacher's k most likely next tokens after token i
with their log-probabilities normalised over the full vocabulary at temperature 1, sorted
descending; rows without a target (`default_valid` False) hold -1 / -inf.

`chunked_topk` is the unavoidable work on top of the backbone: for rows h_i of the final hidden
states (after the last norm) and the lm_head weight W [V, d],

    z_i = W h_i,   lse_i = log sum_v exp(z_iv),   top-k of z_i,   logprob_iv = z_iv - lse_i,

computed `chunk_rows` rows at a time so that only a [chunk_rows, V] block of fp32 logits ever
exists (never an [n, V] log-softmax).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.formats.window import default_valid
from kdcache.teacher_dump.pack import PackedWindow


class EngineError(KdcacheError):
    """The teacher cannot be run as asked (unsupported mode, model, or configuration)."""


@dataclass
class WindowTargets:
    """An engine's output for one window (numpy, ready for a WindowRecord)."""

    ids: np.ndarray  # int32 [n, k]
    logprobs: np.ndarray  # float32 [n, k]
    valid: np.ndarray  # bool [n]


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
    vllm_path: str = "hidden"  # "hidden" (pooling + chunked top-k) | "prompt-logprobs"
    device: str = "auto"  # HF engine: "cpu", "cuda" or "auto"
    kv_cache_gib: float = 1.0  # vLLM-CPU KV cache (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float | None = None  # vLLM's share of the GPU (None: vLLM's default)


class TeacherEngine(ABC):
    """One teacher model held in memory; `topk` is called once per window."""

    name: str = "base"
    modes: tuple[str, ...] = ()

    def __init__(self, cfg: EngineConfig) -> None:
        if cfg.mode not in self.modes:
            raise EngineError(f"engine {self.name!r} cannot serve packing mode {cfg.mode!r} "
                              f"(it serves {', '.join(self.modes)})")
        self.cfg = cfg

    def reconfigure(self, *, k: int, mode: str, window: int) -> None:
        """Serve another k / packing mode without restarting (a started engine is expensive)."""
        from dataclasses import replace

        if mode not in self.modes:
            raise EngineError(f"engine {self.name!r} cannot serve packing mode {mode!r}")
        if window > self.cfg.window:
            raise EngineError(f"window {window} exceeds the {self.cfg.window} this engine "
                              "was started for")
        self.cfg = replace(self.cfg, k=k, mode=mode)

    @abstractmethod
    def topk(self, windows: list[PackedWindow]) -> list[WindowTargets]:
        """Targets for each window, in order."""

    def close(self) -> None:
        """Release the model (engines hold large memory)."""


def segments_for_mode(win: PackedWindow, mode: str) -> list[tuple[int, int, int]]:
    """(start, end, first_position) of each separately run request of a window.

    causal: the whole window from position 0. document: each document from position 0.
    document-global: each document from its offset in the window (a document mask with global
    positions is exactly a per-document run whose positions start at the document's offset).
    """
    if mode == "causal":
        return [(0, win.n_tokens, 0)]
    offs = win.doc_offsets.tolist()
    return [(s, e, s if mode == "document-global" else 0) for s, e in zip(offs[:-1], offs[1:])]


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


def chunked_topk(hidden, weight, k: int, *, chunk_elements: int | None = None, out_ids=None,
                 out_logprobs=None):
    """Top-k full-vocabulary log-probs of `hidden @ weight.T`, a block of rows at a time.

    hidden: [n, d] torch tensor; weight: [V, d]. Returns torch (ids int32 [n, k], logprobs fp32
    [n, k]) or fills `out_ids` / `out_logprobs` (numpy views of the same shape) in place.
    chunk_elements: logits per block; default 2^23 on CPU (cache-sized), 2^28 on a GPU (about
    1,300 rows at V=202,048: 41-row blocks ran the lm_head at ~55 TFLOP/s on an H200). On a GPU
    the results stay on the device until the end: one copy to the host, not one per block.
    """
    import torch

    n = hidden.shape[0]
    vocab = weight.shape[0]
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
            logits = (h @ weight.T).float()  # [rows, V]; the only dense block
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            vals, idx = torch.topk(logits, k, dim=-1, sorted=True)
            dev_lp[start:start + rows] = vals - lse
            dev_ids[start:start + rows] = idx.to(torch.int32)
        if on_gpu:
            lp_t.copy_(dev_lp)
            ids_t.copy_(dev_ids)
    return out_ids, out_logprobs
