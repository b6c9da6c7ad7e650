"""Fixtures for the sparse-KL kernel tests: random problems and the Triton module in interpreter mode."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch


def make_problem(N=9, d=6, V=37, k=5, *, kind="topk", dtype=torch.float64, seed=0, bias=True,
                 ignore_rows=(1,), pad_row=2, empty_row=None, label_in_targets_row=0):
    """Random hidden/weight and teacher targets: `topk` = top-k log-probs of a random teacher,
    `sampled` = log of empirical weights of 3k draws (they sum to 1)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=dtype)
    W = torch.randn(V, d, generator=g, dtype=dtype) / d**0.5 * 2
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    teacher = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, dim=1)
    if kind == "topk":
        lp, ids = teacher.topk(k, dim=1)
    else:
        draws = torch.multinomial(teacher.exp(), 3 * k, replacement=True, generator=g)
        ids = torch.full((N, k), -1, dtype=torch.int64)
        lp = torch.full((N, k), float("-inf"), dtype=torch.float64)
        for n in range(N):
            uniq, counts = draws[n].unique(return_counts=True)
            order = counts.argsort(descending=True)[:k]
            uniq, counts = uniq[order], counts[order].double()
            ids[n, : len(uniq)] = uniq
            lp[n, : len(uniq)] = (counts / counts.sum()).log()
    ids = ids.clone()
    lp = lp.float()
    if pad_row is not None and k > 1:
        ids[pad_row, k // 2 :] = -1
        lp[pad_row, k // 2 :] = float("-inf")
    if empty_row is not None:
        ids[empty_row] = -1
        lp[empty_row] = float("-inf")
    labels = torch.randint(0, V, (N,), generator=g)
    if label_in_targets_row is not None:
        labels[label_in_targets_row] = ids[label_in_targets_row, 0]
    for r in ignore_rows:
        labels[r] = -100
    return dict(h=h, W=W, b=b, ids=ids.to(torch.int32), lp=lp, labels=labels)


def dense_losses(h, W, b, ids, lp, labels, *, tail="renormalize", T=1.0, ignore_index=-100,
                 reduction="mean"):
    """Float64 dense computation of (KD, CE): the ground truth, N x V logits in full."""
    h, W = h.double(), W.double()
    z = h @ W.T + (b.double() if b is not None else 0.0)
    ids = ids.long()
    valid = ids >= 0
    lp = torch.where(valid, lp.double(), float("-inf"))
    logp_T = torch.log_softmax(z / T, dim=1)
    logp_ids = logp_T.gather(1, ids.clamp_min(0))
    if tail == "renormalize":
        log_q = torch.log_softmax(lp / T, dim=1)
        q = torch.where(valid, log_q.exp(), 0.0)
        q = torch.nan_to_num(q)
        kd = T * T * torch.where(q > 0, q * (log_q - logp_ids), 0.0).sum(1)
    else:
        q = torch.where(valid, lp.exp(), 0.0)
        Q = q.sum(1)
        qt = (1 - Q).clamp_min(0)
        P = torch.where(valid, logp_ids.exp(), 0.0).sum(1)
        tail_term = torch.where(qt > 0, qt * (torch.log(qt.clamp_min(1e-300)) - torch.log1p(-P)), 0.0)
        kd = torch.where(q > 0, q * (lp - logp_ids), 0.0).sum(1) + tail_term
    if labels is not None:
        active = labels != ignore_index
        ce = -torch.log_softmax(z, dim=1).gather(1, torch.where(active, labels, 0)[:, None])[:, 0]
        ce = ce * active
    else:
        active = valid.any(1)
        ce = None
    kd = kd * active
    denom = active.sum().clamp_min(1)

    def red(x):
        if x is None or reduction == "none":
            return x
        return x.sum() / denom if reduction == "mean" else x.sum()

    return red(kd), red(ce)


@pytest.fixture(scope="session")
def triton_interp():
    """kdcache.kernels.sparse_kl_triton with its kernel built for TRITON_INTERPRET=1 (CPU)."""
    os.environ["TRITON_INTERPRET"] = "1"
    name = "kdcache.kernels.sparse_kl_triton"
    if name in sys.modules:
        mod = importlib.reload(sys.modules[name])
    else:
        mod = importlib.import_module(name)
    mod.POISON_OUTPUTS = True
    yield mod
    mod.POISON_OUTPUTS = False
