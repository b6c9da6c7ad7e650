"""Chunked PyTorch reference for the fused linear sparse-KL loss: exact, memory-bounded, any device.

The math (one row n, logits z = h_n W^T + b over the full vocabulary V, temperature T):

    log p_v   = z_v / T - lse_T,          lse_T = logsumexp(z / T)
    renormalize: q_i = softmax(t / T)_i over the row's valid ids (t = teacher log-probs)
                 KD  = T^2 * sum_i q_i (log q_i - log p_i)
                 dKD/dz_v = T * (Q p_v - q_v [v in ids]),      Q = sum_i q_i (1, or 0 if no ids)
    bucket (T=1): q_i = exp(t_i); teacher tail q_t = 1 - Q; student tail 1 - P, P = sum_i p_i
                 KD  = sum_i q_i (t_i - log p_i) + q_t (log q_t - log1p(-P))
                 dKD/dz_v = (Q - q_t P / (1-P)) p_v + [v in ids] (q_t p_v / (1-P) - q_v)
    CE (T=1):    CE = lse_1 - z_label,    dCE/dz_v = softmax(z)_v - [v == label]

`loss_and_grads` returns the per-row losses and the gradient of sum_n (a_n KD_n + c_n CE_n) for
given per-row weights a, c (the autograd Function folds masking, the mean's denominator and the
caller's loss weights into them). Memory is bounded by chunking rows (`chunk_rows`) and the
vocabulary (`chunk_vocab`): pass 1 computes each row's logsumexp block by block and gathers the
logits at the target ids and the label; pass 2 recomputes each logits block, turns it into its
gradient block and accumulates dh, dW, db. Nothing of size N x V ever exists.

Numerics: fp32 math for bf16/fp16/fp32 inputs (float64 for float64 inputs), fp32/f64 dW.
The student tail is clamped at 1 - P >= TAIL_EPS so that log1p(-P) and its gradient stay finite
when the student puts (numerically) all its mass on the target ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Smallest student tail mass 1 - P used in the bucket term (below it the tail is held constant).
TAIL_EPS = 1e-6


@dataclass
class RowStats:
    """Per-row quantities both passes need (shapes [C] or [C, k], compute dtype)."""

    kd: torch.Tensor  # [C] KD loss per row (unweighted)
    ce: torch.Tensor | None  # [C] CE loss per row (unweighted)
    lse_t: torch.Tensor  # [C] logsumexp(z / T)
    lse_1: torch.Tensor  # [C] logsumexp(z)
    dense_kd: torch.Tensor  # [C] coefficient of p_T(v) in dKD/dz_v
    sparse_kd: torch.Tensor  # [C, k] extra dKD/dz at each target id (0 where invalid)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_stats(
    z_ids: torch.Tensor,
    valid: torch.Tensor,
    t: torch.Tensor,
    lse_t: torch.Tensor,
    lse_1: torch.Tensor,
    z_label: torch.Tensor | None,
    *,
    tail: str,
    temperature: float,
) -> RowStats:
    """Losses and gradient coefficients of a block of rows from their logsumexps and the logits
    gathered at the target ids (z_ids [C, k]) and labels (z_label [C])."""
    T = temperature
    neg_inf = torch.tensor(float("-inf"), dtype=t.dtype, device=t.device)
    t = torch.where(valid, t, neg_inf)
    log_p_ids = z_ids / T - lse_t[:, None]  # finite even where p underflows
    if tail == "renormalize":
        t_over_T = t / T
        lse_q = torch.logsumexp(t_over_T, dim=1, keepdim=True)
        has_any = valid.any(dim=1)
        log_q = torch.where(valid, t_over_T - torch.where(has_any[:, None], lse_q, 0.0), 0.0)
        q = torch.where(valid, log_q.exp(), 0.0)
        kd = T * T * torch.where(q > 0, q * (log_q - log_p_ids), 0.0).sum(dim=1)
        dense_kd = T * q.sum(dim=1)
        sparse_kd = -T * q
    elif tail == "bucket":
        q = torch.where(valid, t.exp(), 0.0)
        Q = q.sum(dim=1)
        q_tail = (1.0 - Q).clamp_min(0.0)
        p_ids = torch.where(valid, log_p_ids.exp(), 0.0)
        P = p_ids.sum(dim=1)
        clamped = P > 1.0 - TAIL_EPS
        P_c = torch.where(clamped, 1.0 - TAIL_EPS, P)
        log_tail_s = torch.log1p(-P_c)
        log_tail_t = torch.log1p(-torch.where(q_tail > 0, Q, 0.0))
        head = torch.where(q > 0, q * (t - log_p_ids), 0.0).sum(dim=1)
        tail_term = torch.where(q_tail > 0, q_tail * (log_tail_t - log_tail_s), 0.0)
        kd = head + tail_term
        # d/dz of -q_t log(1-P): q_t/(1-P) * dP/dz; zero where the tail is clamped.
        r = torch.where(clamped, 0.0, q_tail / (1.0 - P_c))
        dense_kd = Q - r * P
        sparse_kd = torch.where(valid, r[:, None] * p_ids - q, 0.0)
    else:  # validated by the caller
        raise ValueError(f"unknown tail mode {tail!r}")
    ce = None if z_label is None else lse_1 - z_label
    return RowStats(kd, ce, lse_t, lse_1, dense_kd, sparse_kd)


def _block_logits(hc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  v0: int, v1: int, cdt: torch.dtype) -> torch.Tensor:
    z = hc @ weight[v0:v1].to(cdt).T
    if bias is not None:
        z = z + bias[v0:v1].to(cdt)
    return z


def _gather_in_block(z: torch.Tensor, idx: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of block z [C, v1-v0] at global ids idx [C, m] (0 where an id is outside)."""
    inside = (idx >= v0) & (idx < v1)
    local = (idx - v0).clamp(0, v1 - v0 - 1)
    return torch.where(inside, z.gather(1, local), 0.0), inside


def loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    kd_weight: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    *,
    tail: str,
    temperature: float,
    chunk_rows: int | None = None,
    chunk_vocab: int | None = None,
):
    """Per-row KD/CE losses [N] and, when kd_weight/ce_weight [N] are given, the gradients
    (dh [N,d] in compute dtype, dW [V,d] and db [V] in compute dtype) of
    sum_n kd_weight[n] * KD_n + ce_weight[n] * CE_n. `labels` must already be in [0, V)."""
    N, d = hidden.shape
    V = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    dev = hidden.device
    T = float(temperature)
    want_grads = kd_weight is not None
    # Bound each logits block to ~16M elements (64 MiB in fp32) by default.
    C = chunk_rows or max(1, min(N, 1024))
    VB = chunk_vocab or max(1, min(V, (1 << 24) // max(C, 1)))
    ids_all = target_ids.long()
    # Losses in fp32 (float64 for float64 inputs, so gradcheck can difference them).
    kd_rows = torch.empty(N, dtype=cdt, device=dev)
    ce_rows = torch.empty(N, dtype=cdt, device=dev) if labels is not None else None
    dh = torch.zeros(N, d, dtype=cdt, device=dev) if want_grads else None
    dW = torch.zeros(V, d, dtype=cdt, device=dev) if want_grads else None
    db = torch.zeros(V, dtype=cdt, device=dev) if (want_grads and bias is not None) else None

    for r0 in range(0, N, C):
        r1 = min(N, r0 + C)
        hc = hidden[r0:r1].to(cdt)
        ids = ids_all[r0:r1]
        valid = ids >= 0
        lab = labels[r0:r1].long()[:, None] if labels is not None else None
        # Pass 1: online logsumexp over vocabulary blocks, and gathers at ids / label.
        lse_t = torch.full((r1 - r0,), float("-inf"), dtype=cdt, device=dev)
        lse_1 = lse_t.clone()
        z_ids = torch.zeros(ids.shape, dtype=cdt, device=dev)
        z_lab = torch.zeros((r1 - r0, 1), dtype=cdt, device=dev) if lab is not None else None
        for v0 in range(0, V, VB):
            v1 = min(V, v0 + VB)
            z = _block_logits(hc, weight, bias, v0, v1, cdt)
            lse_t = torch.logaddexp(lse_t, torch.logsumexp(z / T, dim=1))
            if T != 1.0:
                lse_1 = torch.logaddexp(lse_1, torch.logsumexp(z, dim=1))
            z_ids += _gather_in_block(z, ids, v0, v1)[0]
            if lab is not None:
                z_lab += _gather_in_block(z, lab, v0, v1)[0]
        if T == 1.0:
            lse_1 = lse_t
        st = row_stats(z_ids, valid, target_logprobs[r0:r1].to(cdt), lse_t, lse_1,
                       None if z_lab is None else z_lab[:, 0], tail=tail, temperature=T)
        kd_rows[r0:r1] = st.kd
        if ce_rows is not None:
            ce_rows[r0:r1] = st.ce
        if not want_grads:
            continue
        # Pass 2: recompute each logits block and turn it into its gradient block.
        a = kd_weight[r0:r1].to(cdt)
        c = ce_weight[r0:r1].to(cdt) if (ce_weight is not None and lab is not None) else None
        dense_kd = (a * st.dense_kd)[:, None]
        sparse_kd = a[:, None] * st.sparse_kd
        for v0 in range(0, V, VB):
            v1 = min(V, v0 + VB)
            z = _block_logits(hc, weight, bias, v0, v1, cdt)
            g = dense_kd * torch.exp(z / T - lse_t[:, None])
            if c is not None:
                g += c[:, None] * torch.exp(z - lse_1[:, None])
            _, inside = _gather_in_block(z, ids, v0, v1)
            g.scatter_add_(1, (ids - v0).clamp(0, v1 - v0 - 1), torch.where(inside, sparse_kd, 0.0))
            if c is not None:
                _, lab_in = _gather_in_block(z, lab, v0, v1)
                g.scatter_add_(1, (lab - v0).clamp(0, v1 - v0 - 1), torch.where(lab_in, -c[:, None], 0.0))
            dh[r0:r1] += g @ weight[v0:v1].to(cdt)
            dW[v0:v1] += g.T @ hc
            if db is not None:
                db[v0:v1] += g.sum(dim=0)
    return kd_rows, ce_rows, dh, dW, db
