"""Fused linear sparse-KL loss: lm_head matmul + full-vocabulary softmax + sparse teacher targets.

`fused_sparse_kl(h, W, ids, logprobs, labels)` returns (KD, CE) without ever materialising the
N x V logits. Design (after Liger's fused linear cross-entropy): the gradient is formed in the
*forward* pass, chunk by chunk, while a bounded block of logits is in hand; recomputing the logits
in backward would cost 8NdV instead of 6NdV. Because the gradient is built before the caller's
loss weights are known, the forward assumes the caller will back-propagate
`loss_weights[0] * KD + loss_weights[1] * CE` (times any scalar). The backward then only scales
the stored dh, dW, db by that scalar. If the gradients that arrive are in another ratio (e.g. only
KD is used, or reduction="none" with per-row weights), the backward recomputes exactly with the
weights it received: correct always, fast when the hint is right.

Implementations (same math, see sparse_kl_reference.py for the formulas):
- "triton": cuBLAS matmuls per row chunk + a Triton kernel for the online logsumexp, the sparse
  gather and the in-place logits -> gradient transform (sparse_kl_triton.py). Default on CUDA.
- "reference": chunked PyTorch (sparse_kl_reference.py). Default elsewhere.
Force one with `impl=` or the environment variable KDCACHE_SPARSE_KL_IMPL.
"""

from __future__ import annotations

import os

import torch

from kdcache.errors import KdcacheError
from kdcache.kernels import sparse_kl_reference

TAIL_MODES = ("renormalize", "bucket")
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("triton", "reference")
IMPL_ENV = "KDCACHE_SPARSE_KL_IMPL"


class SparseKLInputError(KdcacheError):
    """Arguments of fused_sparse_kl have the wrong shape, dtype, device or value range."""


def _pick_impl(impl: str | None, device: torch.device) -> str:
    impl = impl or os.environ.get(IMPL_ENV) or ("triton" if device.type == "cuda" else "reference")
    if impl not in IMPLS:
        raise SparseKLInputError(f"fused_sparse_kl: impl must be one of {IMPLS}, got {impl!r}")
    return impl


def _core(impl: str):
    if impl == "triton":
        # Triton only for the Triton path: CPU machines may lack it and it is slow to import.
        from kdcache.kernels import sparse_kl_triton

        return sparse_kl_triton.loss_and_grads
    return sparse_kl_reference.loss_and_grads


class _FusedSparseKL(torch.autograd.Function):
    """Losses and pre-formed gradients in forward; backward scales them (or recomputes exactly)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, target_logprobs, labels, active, opts):
        impl, tail, T, reduction, loss_weights, chunk_rows, grad_mode = opts
        has_ce = labels is not None
        n_active = active.sum()
        ldt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        denom = n_active.clamp_min(1).to(ldt)
        row_scale = active.to(ldt)
        if reduction == "mean":
            row_scale = row_scale / denom
        # forward() runs with grad mode off; grad_mode is the caller's (no gradients under no_grad).
        want = grad_mode and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        w_kd, w_ce = (float(loss_weights[0]), float(loss_weights[1]) if has_ce else 0.0)
        core = _core(impl)
        kd_rows, ce_rows, dh, dW, db = core(
            hidden, weight, bias, target_ids, target_logprobs, labels,
            w_kd * row_scale if want else None, w_ce * row_scale if (want and has_ce) else None,
            tail=tail, temperature=T, chunk_rows=chunk_rows,
        )
        kd_rows = kd_rows * active
        ce_rows = ce_rows * active if has_ce else None

        def reduce(rows):
            if reduction == "none":
                return rows
            total = rows.sum()
            return total / denom if reduction == "mean" else total

        kd = reduce(kd_rows)
        ce = reduce(ce_rows) if has_ce else None
        ctx.opts = opts
        ctx.has_ce = has_ce
        ctx.w = (w_kd, w_ce)
        ctx.has_bias = bias is not None
        if want:
            ctx.grads = (
                dh.to(hidden.dtype) if ctx.needs_input_grad[0] else None,
                dW.to(weight.dtype) if ctx.needs_input_grad[1] else None,
                db.to(bias.dtype) if (db is not None and ctx.needs_input_grad[2]) else None,
            )
            ctx.save_for_backward(hidden, weight, bias, target_ids, target_logprobs, labels, row_scale)
        return kd, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_kd, g_ce):
        hidden, weight, bias, target_ids, target_logprobs, labels, row_scale = ctx.saved_tensors
        impl, tail, T, reduction, _, chunk_rows, _ = ctx.opts
        w_kd, w_ce = ctx.w
        zero = torch.zeros((), dtype=row_scale.dtype, device=row_scale.device)
        g_kd = zero if g_kd is None else g_kd.to(row_scale.dtype)
        g_ce = zero if (g_ce is None or not ctx.has_ce) else g_ce.to(row_scale.dtype)
        scale = _common_scale(g_kd, g_ce, w_kd, w_ce)
        if scale is not None and ctx.grads is not None:
            # Scale the stored gradients in place (no second copy of dW), and hand them over:
            # a second backward through this node (retain_graph) takes the recompute path.
            dh, dW, db = ctx.grads
            ctx.grads = None
            if scale != 1.0:
                for x in (dh, dW, db):
                    if x is not None:
                        x.mul_(scale)
        else:  # the caller weighted KD and CE differently from the hint: recompute exactly
            a = g_kd * row_scale
            c = g_ce * row_scale if ctx.has_ce else None
            a = a.expand_as(row_scale).contiguous()
            c = c.expand_as(row_scale).contiguous() if c is not None else None
            _, _, dh, dW, db = _core(impl)(
                hidden, weight, bias, target_ids, target_logprobs, labels, a, c,
                tail=tail, temperature=T, chunk_rows=chunk_rows,
            )
            dh = dh.to(hidden.dtype) if ctx.needs_input_grad[0] else None
            dW = dW.to(weight.dtype) if ctx.needs_input_grad[1] else None
            db = db.to(bias.dtype) if (db is not None and ctx.needs_input_grad[2]) else None
        return dh, dW, db, None, None, None, None, None


def _common_scale(g_kd: torch.Tensor, g_ce: torch.Tensor, w_kd: float, w_ce: float) -> float | None:
    """The scalar s with (g_kd, g_ce) == s * (w_kd, w_ce) everywhere, or None if there is none."""
    # one device -> host read for all four facts: each read stalls the GPU queue
    first_kd, first_ce = g_kd.flatten()[0], g_ce.flatten()[0]
    one = torch.ones((), dtype=torch.bool, device=g_kd.device)
    same_kd = (g_kd == first_kd).all() if g_kd.numel() != 1 else one
    same_ce = (g_ce == first_ce).all() if g_ce.numel() != 1 else one
    gk, gc, uniform_kd, uniform_ce = torch.stack(
        [first_kd.double(), first_ce.double(), same_kd.double(), same_ce.double()]).tolist()
    if not (uniform_kd and uniform_ce):
        return None
    ref = w_kd if w_kd != 0 else w_ce
    s = (gk if w_kd != 0 else gc) / ref if ref != 0 else 0.0
    tol = 1e-6 * max(abs(gk), abs(gc), 1e-30)
    if abs(gk - s * w_kd) <= tol and abs(gc - s * w_ce) <= tol:
        return s
    return None


def _bad(msg: str):
    raise SparseKLInputError(f"fused_sparse_kl: {msg}")


def _validate(hidden, weight, target_ids, target_logprobs, labels, bias, tail, temperature,
              reduction) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        _bad(f"hidden must be [N, d] and weight [V, d]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    N, d = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != d:
        _bad(f"hidden has d={d} but weight is {tuple(weight.shape)} (expected [V, {d}])")
    if not hidden.is_floating_point() or weight.dtype != hidden.dtype:
        _bad(f"hidden and weight must share one floating dtype; got {hidden.dtype} and {weight.dtype}")
    if target_ids.shape != target_logprobs.shape or target_ids.dim() != 2 or target_ids.shape[0] != N:
        _bad(f"target_ids and target_logprobs must both be [N={N}, k]; got {tuple(target_ids.shape)} "
             f"and {tuple(target_logprobs.shape)}")
    if target_ids.dtype not in (torch.int32, torch.int64):
        _bad(f"target_ids must be int32 or int64, got {target_ids.dtype}")
    if not target_logprobs.is_floating_point():
        _bad(f"target_logprobs must be floating point, got {target_logprobs.dtype}")
    if target_ids.shape[1] < 1:
        _bad("target_ids needs at least one column (k >= 1)")
    for name, t in (("weight", weight), ("target_ids", target_ids), ("target_logprobs", target_logprobs),
                    ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            _bad(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if labels is not None and (labels.shape != (N,) or labels.is_floating_point()):
        _bad(f"labels must be an integer tensor [N={N}]; got {labels.dtype} {tuple(labels.shape)}")
    if bias is not None and bias.shape != (V,):
        _bad(f"bias must be [V={V}]; got {tuple(bias.shape)}")
    if tail not in TAIL_MODES:
        _bad(f"tail must be one of {TAIL_MODES}, got {tail!r}")
    if reduction not in REDUCTIONS:
        _bad(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not temperature > 0:
        _bad(f"temperature must be > 0, got {temperature}")
    if tail == "bucket" and temperature != 1.0:
        _bad(f'tail="bucket" is defined at temperature 1 only (got {temperature}); use tail="renormalize"')


def _check_id_ranges(target_ids: torch.Tensor, labels: torch.Tensor | None, active: torch.Tensor,
                     V: int, ignore_index: int) -> None:
    """target_ids in [-1, V) and the active labels in [0, V), read back to the host at once:
    each device -> host read stalls the GPU queue."""
    facts = []
    if target_ids.numel():
        facts += [target_ids.min().long(), target_ids.max().long()]
    if labels is not None and labels.numel():
        wide = labels.long()
        big = 2**62  # fills that no active label beats: the range read is the active labels'
        facts += [active.any().long(), torch.where(active, wide, big).min(),
                  torch.where(active, wide, -big).max()]
    if not facts:
        return
    values = torch.stack(facts).tolist()
    if target_ids.numel():
        lo, hi = values[:2]
        if lo < -1 or hi >= V:
            _bad(f"target_ids must lie in [-1, V={V}) (-1 pads); found values in [{lo}, {hi}]")
        values = values[2:]
    if values and values[0]:  # some label is active
        lo, hi = values[1:]
        if lo < 0 or hi >= V:
            _bad(f"labels must lie in [0, V={V}) or equal ignore_index={ignore_index}; "
                 f"found values in [{lo}, {hi}]")


def fused_sparse_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    tail: str = "renormalize",
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    loss_weights: tuple[float, float] = (1.0, 1.0),
    impl: str | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KD and CE losses of a linear head against sparse teacher targets, without N x V logits.

    hidden [..., d], weight [V, d] (bias [V]); target_ids [..., k] (int32/int64, -1 pads) with
    teacher log-probs target_logprobs [..., k] (-inf where padded; sampled targets: log-weights
    that sum to 1); labels [...] the true next tokens (ignore_index masks a position for both
    losses). Ids within a row must be distinct (top-k and sampled targets are).

    KD = T^2 sum_i q_i (log q_i - log p_i), q = softmax(target_logprobs / T) over the row's valid
    ids, p = softmax(z / T) over the full vocabulary, z = hidden @ weight.T + bias.
    tail="bucket" (T = 1 only) adds the category "not in ids": teacher mass 1 - sum(exp(t)) against
    student mass 1 - sum(p at the ids). CE = -log softmax(z)[label] at T = 1.
    reduction="mean" divides by the number of positions whose label != ignore_index (positions with
    >= 1 valid id when labels is None; 0 if there are none); "sum"; "none" gives per-position
    losses (0 at masked positions). Losses are float32; ce_loss is None without labels.

    loss_weights: the (KD, CE) weights of the loss you will back-propagate (any common scale), used
    to pre-form the gradient in the forward pass; other weights are still exact but cost a second
    pass. impl: "triton" | "reference" (default: triton on CUDA). chunk_rows: rows per chunk.
    """
    lead_shape = hidden.shape[:-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target_ids = target_ids.reshape(-1, target_ids.shape[-1])
    target_logprobs = target_logprobs.reshape(-1, target_logprobs.shape[-1])
    if labels is not None:
        labels = labels.reshape(-1)
    _validate(hidden, weight, target_ids, target_logprobs, labels, bias, tail, temperature, reduction)
    active = labels != ignore_index if labels is not None else (target_ids >= 0).any(dim=1)
    _check_id_ranges(target_ids, labels, active, weight.shape[0], ignore_index)
    if labels is not None:
        labels = torch.where(active, labels, 0).long()
    opts = (_pick_impl(impl, hidden.device), tail, float(temperature), reduction,
            tuple(loss_weights), chunk_rows, torch.is_grad_enabled())
    kd, ce = _FusedSparseKL.apply(hidden, weight, bias, target_ids, target_logprobs.float(), labels,
                                  active, opts)
    if reduction == "none":
        kd = kd.reshape(lead_shape)
        ce = ce.reshape(lead_shape) if ce is not None else None
    return kd, ce
