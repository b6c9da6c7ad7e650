"""The chunked PyTorch reference against a float64 dense computation, gradcheck and input checks."""

from __future__ import annotations

import pytest
import torch

from kdcache.kernels import SparseKLInputError, fused_sparse_kl
from tests.kernels.conftest import dense_losses, make_problem

CASES = [
    # (kind, tail, T, reduction, with_labels)
    ("topk", "renormalize", 1.0, "mean", True),
    ("topk", "renormalize", 2.0, "sum", True),
    ("topk", "bucket", 1.0, "mean", True),
    ("topk", "bucket", 1.0, "none", False),
    ("sampled", "renormalize", 1.0, "mean", True),
    ("sampled", "renormalize", 0.5, "none", True),
    ("topk", "renormalize", 1.5, "mean", False),
]


def _grads(loss, inputs, retain=False):
    return torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=retain)


@pytest.mark.parametrize("kind,tail,T,reduction,with_labels", CASES)
def test_reference_matches_dense_float64(kind, tail, T, reduction, with_labels):
    p = make_problem(N=11, d=6, V=41, k=6, kind=kind, seed=hash((kind, tail, T)) % 1000, empty_row=5)
    labels = p["labels"] if with_labels else None
    leaves = [p["h"].requires_grad_(), p["W"].requires_grad_(), p["b"].requires_grad_()]
    kd_ref, ce_ref = dense_losses(p["h"], p["W"], p["b"], p["ids"], p["lp"], labels, tail=tail, T=T,
                                  reduction=reduction)
    # Loss weights other than the (1, 1) hint go through the exact recompute path.
    for wk, wc in ((1.0, 1.0), (0.3, 0.7)):
        kd, ce = fused_sparse_kl(p["h"], p["W"], p["ids"], p["lp"], labels, bias=p["b"], tail=tail,
                                 temperature=T, reduction=reduction, impl="reference", chunk_rows=4)
        torch.testing.assert_close(kd, kd_ref, rtol=1e-10, atol=1e-12)
        assert (ce is None) == (ce_ref is None)
        if ce is not None:
            torch.testing.assert_close(ce, ce_ref, rtol=1e-10, atol=1e-12)
        total = (wk * kd + (wc * ce if ce is not None else 0.0)).sum()
        total_ref = (wk * kd_ref + (wc * ce_ref if ce_ref is not None else 0.0)).sum()
        for g, g_ref in zip(_grads(total, leaves), _grads(total_ref, leaves, retain=True)):
            torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_reference_vocab_chunks_and_fp32():
    """Small vocabulary blocks (several per row) and fp32 inputs; losses fp32, grads in input dtype."""
    from kdcache.kernels import sparse_kl_reference as ref

    p = make_problem(N=10, d=5, V=53, k=4, dtype=torch.float32, seed=3)
    a = torch.rand(10)
    c = torch.rand(10)
    labels = p["labels"].clamp_min(0)
    out_small = ref.loss_and_grads(p["h"], p["W"], p["b"], p["ids"], p["lp"], labels, a, c,
                                   tail="renormalize", temperature=1.0, chunk_rows=3, chunk_vocab=7)
    out_big = ref.loss_and_grads(p["h"], p["W"], p["b"], p["ids"], p["lp"], labels, a, c,
                                 tail="renormalize", temperature=1.0)
    for x, y in zip(out_small, out_big):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail,T", [("renormalize", 2.0), ("bucket", 1.0)])
def test_reference_gradcheck(tail, T):
    p = make_problem(N=5, d=3, V=9, k=3, seed=7, pad_row=2, ignore_rows=(1,))
    inputs = (p["h"].requires_grad_(), p["W"].requires_grad_(), p["b"].requires_grad_())

    def f(h, W, b):
        return fused_sparse_kl(h, W, p["ids"], p["lp"], p["labels"], bias=b, tail=tail, temperature=T,
                               reduction="none", impl="reference", chunk_rows=2)

    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_no_nan_when_teacher_mass_is_one_or_student_underflows():
    p = make_problem(N=6, d=4, V=23, k=3, seed=11)
    ids, lp = p["ids"].clone(), p["lp"].clone()
    # Row 0: the teacher puts all its mass on one id (others -inf). Row 3: one target only.
    lp[0] = torch.tensor([0.0, float("-inf"), float("-inf")])
    lp[3, 1:], ids[3, 1:] = float("-inf"), -1
    # Huge logits: student probabilities at most targets underflow to exactly 0 in fp32.
    h = p["h"].float() * 300
    W = p["W"].float().requires_grad_()
    for tail in ("renormalize", "bucket"):
        kd, ce = fused_sparse_kl(h, W, ids, lp, p["labels"], tail=tail, impl="reference")
        (gw,) = torch.autograd.grad(kd + ce, [W])
        assert torch.isfinite(kd) and torch.isfinite(ce) and torch.isfinite(gw).all()


def test_student_mass_on_targets_clamps_tail():
    """Bucket mode when the student's mass sits (numerically) entirely on the ids: finite, >= 0."""
    V, d = 8, 8
    W = torch.eye(V, d) * 60
    h = torch.zeros(2, d)
    h[:, 0] = 1.0
    ids = torch.tensor([[0, 1], [0, 2]], dtype=torch.int32)
    lp = torch.log(torch.tensor([[0.5, 0.3], [0.9, 0.05]]))
    W.requires_grad_()
    kd, _ = fused_sparse_kl(h, W, ids, lp, tail="bucket", impl="reference")
    (gw,) = torch.autograd.grad(kd, [W])
    assert torch.isfinite(kd) and kd > 0 and torch.isfinite(gw).all()


def test_all_positions_ignored_gives_zero():
    p = make_problem(N=4, d=3, V=7, k=2, ignore_rows=(0, 1, 2, 3), seed=2)
    kd, ce = fused_sparse_kl(p["h"], p["W"], p["ids"], p["lp"], p["labels"], impl="reference")
    assert kd.item() == 0.0 and ce.item() == 0.0


def test_leading_dims_and_none_reduction_shape():
    p = make_problem(N=12, d=4, V=15, k=3, dtype=torch.float32, seed=4)
    h3 = p["h"].reshape(3, 4, 4)
    kd, ce = fused_sparse_kl(h3, p["W"], p["ids"].reshape(3, 4, 3), p["lp"].reshape(3, 4, 3),
                             p["labels"].reshape(3, 4), reduction="none", impl="reference")
    assert kd.shape == (3, 4) and ce.shape == (3, 4) and kd.dtype == torch.float32
    assert kd.reshape(-1)[1] == 0 and ce.reshape(-1)[1] == 0  # row 1 is ignored


@pytest.mark.parametrize("change,match", [
    (dict(tail="bucket", temperature=2.0), "temperature 1 only"),
    (dict(tail="topk"), "tail must be one of"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(impl="cuda"), "impl must be one of"),
])
def test_bad_options_raise(change, match):
    p = make_problem(N=4, d=3, V=7, k=2, seed=1)
    with pytest.raises(SparseKLInputError, match=match):
        fused_sparse_kl(p["h"], p["W"], p["ids"], p["lp"], p["labels"], **change)


def test_bad_tensors_raise():
    p = make_problem(N=4, d=3, V=7, k=2, seed=1)
    bad_ids = p["ids"].clone()
    bad_ids[0, 0] = 7
    with pytest.raises(SparseKLInputError, match="target_ids must lie in"):
        fused_sparse_kl(p["h"], p["W"], bad_ids, p["lp"], p["labels"])
    bad_labels = p["labels"].clone()
    bad_labels[0] = 99
    with pytest.raises(SparseKLInputError, match="labels must lie in"):
        fused_sparse_kl(p["h"], p["W"], p["ids"], p["lp"], bad_labels)
    # the range read is the active labels' alone: a negative one is caught, ignored ones are not
    negative = p["labels"].clone()
    negative[:] = -100
    negative[1] = -5
    with pytest.raises(SparseKLInputError, match=r"found values in \[-5, -5\]"):
        fused_sparse_kl(p["h"], p["W"], p["ids"], p["lp"], negative)
    negative[1] = 3
    kd, ce = fused_sparse_kl(p["h"], p["W"], p["ids"], p["lp"], negative)
    assert torch.isfinite(kd) and torch.isfinite(ce)
    negative[1] = -100  # nothing active: no label to check, zero losses
    kd, ce = fused_sparse_kl(p["h"], p["W"], p["ids"], p["lp"], negative)
    assert float(kd) == 0.0 and float(ce) == 0.0
    with pytest.raises(SparseKLInputError, match="weight is"):
        fused_sparse_kl(p["h"], p["W"][:, :2], p["ids"], p["lp"], p["labels"])
    with pytest.raises(SparseKLInputError, match=r"\[N=4, k\]"):
        fused_sparse_kl(p["h"], p["W"], p["ids"][:3], p["lp"][:3], p["labels"])


def test_no_grad_skips_gradient_work(monkeypatch):
    """Under torch.no_grad (evaluation) the forward must not form gradients (3x the work)."""
    from kdcache.kernels import sparse_kl_reference as ref

    calls = []
    real = ref.loss_and_grads

    def spy(*args, **kwargs):
        calls.append(args[6] is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(ref, "loss_and_grads", spy)
    p = make_problem(N=5, d=3, V=9, k=2, dtype=torch.float32, seed=6)
    h = p["h"].requires_grad_()
    with torch.no_grad():
        kd_eval, _ = fused_sparse_kl(h, p["W"], p["ids"], p["lp"], p["labels"], impl="reference")
    kd_train, _ = fused_sparse_kl(h, p["W"], p["ids"], p["lp"], p["labels"], impl="reference")
    assert calls == [False, True]
    assert kd_eval.grad_fn is None and kd_train.grad_fn is not None
    torch.testing.assert_close(kd_eval, kd_train.detach())
