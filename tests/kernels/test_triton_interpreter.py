"""The Triton kernel, run by TRITON_INTERPRET=1 on CPU in fp32, against the chunked reference.

Outputs are poisoned with NaN before each run (triton_interp sets POISON_OUTPUTS), so an element
the kernel fails to write shows as NaN. Shapes are tiny: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import pytest
import torch

from kdcache.kernels import fused_sparse_kl, sparse_kl_reference
from tests.kernels.conftest import make_problem

# (N, V, k, block_v, chunk_rows): odd N/V/k, V < block, k = 1, several chunks and vocabulary tiles.
SHAPES = [
    (7, 37, 5, 16, 3),
    (5, 13, 1, 32, 5),  # k = 1, V < BLOCK_V
    (6, 50, 9, 8, 4),
]


def _compare(out, ref, rtol=2e-5, atol=2e-6):
    names = ("kd_rows", "ce_rows", "dh", "dW", "db")
    for name, x, y in zip(names, out, ref):
        if y is None:
            assert x is None, name
            continue
        assert not torch.isnan(x).any(), f"{name} has NaN (unwritten or bad math)"
        torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("N,V,k,block_v,chunk", SHAPES)
@pytest.mark.parametrize("tail,T", [("renormalize", 1.0), ("renormalize", 2.0), ("bucket", 1.0)])
def test_kernel_matches_reference(triton_interp, N, V, k, block_v, chunk, tail, T):
    p = make_problem(N=N, d=6, V=V, k=k, dtype=torch.float32, seed=N * V + k, empty_row=N - 1)
    labels = torch.where(p["labels"] < 0, 0, p["labels"])
    a = torch.rand(N) * (p["labels"] >= 0)
    c = torch.rand(N) * (p["labels"] >= 0)
    args = (p["h"], p["W"], p["b"], p["ids"], p["lp"], labels, a, c)
    out = triton_interp.loss_and_grads(*args, tail=tail, temperature=T, chunk_rows=chunk, block_v=block_v)
    ref = sparse_kl_reference.loss_and_grads(*args, tail=tail, temperature=T, chunk_rows=chunk)
    _compare(out, ref)


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_kernel_without_labels_or_bias_and_loss_only(triton_interp, kind):
    p = make_problem(N=6, d=5, V=29, k=4, kind=kind, dtype=torch.float32, seed=5, bias=False)
    a = torch.rand(6)
    args = (p["h"], p["W"], None, p["ids"].long(), p["lp"], None)
    out = triton_interp.loss_and_grads(*args, a, None, tail="renormalize", temperature=1.0,
                                       chunk_rows=4, block_v=8)
    ref = sparse_kl_reference.loss_and_grads(*args, a, None, tail="renormalize", temperature=1.0)
    _compare(out, ref)
    loss_only = triton_interp.loss_and_grads(*args, None, None, tail="renormalize", temperature=1.0,
                                             block_v=8)
    assert loss_only[2] is None and loss_only[3] is None
    torch.testing.assert_close(loss_only[0], ref[0], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("tail,T,reduction", [("renormalize", 1.0, "mean"), ("bucket", 1.0, "sum"),
                                              ("renormalize", 2.0, "none")])
def test_public_entry_point_triton_vs_reference(triton_interp, tail, T, reduction):
    """fused_sparse_kl(impl="triton") through autograd, with ignore masks and a KD-only backward."""
    p = make_problem(N=8, d=6, V=33, k=4, dtype=torch.float32, seed=21, ignore_rows=(1, 6))
    results = {}
    for impl in ("triton", "reference"):
        h = p["h"].clone().requires_grad_()
        W = p["W"].clone().requires_grad_()
        b = p["b"].clone().requires_grad_()
        kd, ce = fused_sparse_kl(h, W, p["ids"], p["lp"], p["labels"], bias=b, tail=tail, temperature=T,
                                 reduction=reduction, impl=impl, chunk_rows=3)
        (0.5 * kd.sum() + 0.5 * ce.sum()).backward()
        h2 = p["h"].clone().requires_grad_()
        kd2, _ = fused_sparse_kl(h2, W.detach(), p["ids"], p["lp"], p["labels"], bias=b.detach(),
                                 tail=tail, temperature=T, reduction=reduction, impl=impl, chunk_rows=3)
        (kd2.sum()).backward()  # CE unused: exact recompute path
        results[impl] = (kd, ce, h.grad, W.grad, b.grad, h2.grad)
    for x, y in zip(results["triton"], results["reference"]):
        assert not torch.isnan(x).any()
        torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("group", [2, 4, 16])
@pytest.mark.parametrize("tail,T,labels", [("renormalize", 2.0, True), ("bucket", 1.0, True),
                                           ("renormalize", 0.7, False)])
def test_grouped_logsumexp_matches_reference(triton_interp, tail, T, labels, group, monkeypatch):
    """Phase A with one running max per group of adjacent elements (LSE_GROUP) gives the same
    losses and gradients, V not a multiple of the group or the tile."""
    monkeypatch.setattr(triton_interp, "LSE_GROUP", group)
    p = make_problem(N=5, d=4, V=45, k=3, dtype=torch.float32, seed=9 + group)
    lab = torch.where(p["labels"] < 0, 0, p["labels"]) if labels else None
    a, c = torch.rand(5), (torch.rand(5) if labels else None)
    args = (p["h"], p["W"], p["b"], p["ids"], p["lp"], lab, a, c)
    out = triton_interp.loss_and_grads(*args, tail=tail, temperature=T, chunk_rows=3, block_v=16)
    ref = sparse_kl_reference.loss_and_grads(*args, tail=tail, temperature=T)
    _compare(out, ref)


def test_default_chunk_rows_keeps_the_memory_budget(triton_interp):
    """fp32 dW + logits buffer stay within MEMORY_BUDGET_BYTES at the headline shape; the buffer
    never drops under its floor when dW alone is bigger (d=4096)."""
    V, d = 202_048, 1280
    rows = triton_interp.default_chunk_rows(131_072, V, 2, d)
    assert rows % triton_interp.CHUNK_ROW_MULTIPLE == 0 and rows >= 2048
    assert V * d * 4 + rows * V * 2 <= triton_interp.MEMORY_BUDGET_BYTES <= 2 * 2**30
    big = triton_interp.default_chunk_rows(131_072, V, 2, 4096)
    assert big >= 1024 and big * V * 2 >= triton_interp.MIN_LOGITS_BUFFER_BYTES - 1024 * V * 2
    assert triton_interp.default_chunk_rows(100, V, 2, d) == 100
    no_grad = triton_interp.default_chunk_rows(131_072, V, 2, d, want_grads=False)
    assert no_grad > rows
