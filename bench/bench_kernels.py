"""Benchmark and GPU check of kdcache.kernels.fused_sparse_kl, with baselines side by side.

    python bench/bench_kernels.py                 # CPU: small shape, reference vs dense PyTorch
    python bench/bench_kernels.py --check         # CUDA: bf16 Triton path vs float64 reference
    python bench/bench_kernels.py --time          # CUDA: headline shape + grid + baselines

Every result is one JSON line on stdout (and appended to $OUT/kernels_bench.jsonl when OUT is
set); the last line is a summary. Timings are CUDA-event medians after warm-up, of forward +
backward of 0.5*KD + 0.5*CE. "extra_peak_gib" is the peak allocated during one step minus the
inputs and minus the bf16 gradients of h and W (which every method must produce).
Inputs are random (never zeros): h ~ N(0,1), W ~ N(0,1/d), distinct ids per row, a teacher with
10% tail mass (top-k kind) or log-weights summing to 1 (sampled kind), 2% ignored labels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kdcache.kernels import fused_sparse_kl  # noqa: E402

GIB = 2**30
DATE = "2026-11-29"
HEADLINE = dict(N=131072, d=1280, V=202048, k=64)


def emit(rec: dict) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "kernels_bench.jsonl"), "a") as f:
            f.write(line + "\n")


def make_inputs(N, d, V, k, *, dtype, device, seed=0, kind="topk", bias=False):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(N, d, generator=g, device=device, dtype=torch.float32).to(dtype)
    W = (torch.randn(V, d, generator=g, device=device, dtype=torch.float32) / math.sqrt(d)).to(dtype)
    b = (torch.randn(V, generator=g, device=device) * 0.1).to(dtype) if bias else None
    # Distinct ids per row: an arithmetic progression mod V with a per-row start and stride.
    start = torch.randint(0, V, (N, 1), generator=g, device=device)
    stride = torch.randint(1, max(2, V // k), (N, 1), generator=g, device=device)
    ids = ((start + torch.arange(k, device=device) * stride) % V).to(torch.int32)
    logits_t = torch.randn(N, k, generator=g, device=device) * 2
    lp = torch.log_softmax(logits_t, dim=1)
    if kind == "topk":
        lp = lp + math.log(0.9)  # 10% teacher mass outside the ids
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    labels[torch.rand(N, generator=g, device=device) < 0.02] = -100
    return dict(h=h, W=W, b=b, ids=ids, lp=lp, labels=labels)


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return (torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------- correctness
def check_case(name, N, d, V, k, *, tail="renormalize", T=1.0, kind="topk", bias=False, labels=True,
               weights=(0.5, 0.5), chunk_rows=None, device="cuda"):
    p = make_inputs(N, d, V, k, dtype=torch.bfloat16, device=device, seed=N + k, kind=kind, bias=bias)
    lab = p["labels"] if labels else None
    out = {}
    for impl, dt in (("triton", torch.bfloat16), ("reference", torch.float64)):
        h = p["h"].detach().to(dt).clone().requires_grad_()
        W = p["W"].detach().to(dt).clone().requires_grad_()
        b = p["b"].detach().to(dt).clone().requires_grad_() if bias else None
        kd, ce = fused_sparse_kl(h, W, p["ids"], p["lp"], lab, bias=b, tail=tail, temperature=T,
                                 impl=impl, chunk_rows=chunk_rows if impl == "triton" else None)
        loss = weights[0] * kd + (weights[1] * ce if ce is not None else 0.0)
        loss.backward()
        out[impl] = dict(kd=kd.detach(), ce=None if ce is None else ce.detach(), dh=h.grad, dW=W.grad,
                         db=None if b is None else b.grad)
        del h, W, b, kd, ce, loss
    t, r = out["triton"], out["reference"]
    rec = dict(bench="kernels_check", case=name, N=N, d=d, V=V, k=k, tail=tail, T=T, kind=kind, bias=bias,
               labels=labels, weights=list(weights),
               kd=t["kd"].item(), kd_ref=r["kd"].item(),
               kd_rel_err=abs(t["kd"].item() - r["kd"].item()) / abs(r["kd"].item()))
    if r["ce"] is not None:
        rec["ce_rel_err"] = abs(t["ce"].item() - r["ce"].item()) / abs(r["ce"].item())
    for g in ("dh", "dW", "db"):
        if r[g] is not None:
            rec[f"{g}_rel_err"] = rel(t[g], r[g])
            rec[f"{g}_finite"] = bool(torch.isfinite(t[g]).all())
    loss_ok = rec["kd_rel_err"] <= 1e-3 and rec.get("ce_rel_err", 0.0) <= 1e-3
    grad_ok = all(rec[f"{g}_rel_err"] <= 1e-2 and rec[f"{g}_finite"] for g in ("dh", "dW", "db")
                  if f"{g}_rel_err" in rec)
    rec["ok"] = bool(loss_ok and grad_ok)
    emit(rec)
    del out, p
    torch.cuda.empty_cache()
    return rec["ok"]


def run_checks() -> bool:
    V = HEADLINE["V"]
    cases = [
        ("topk_renorm_T1", dict(N=4096, d=1280, V=V, k=64)),
        ("topk_bucket_T1", dict(N=4096, d=1280, V=V, k=64, tail="bucket")),
        ("odd_multichunk_T2_bias", dict(N=3001, d=1280, V=50001, k=16, T=2.0, bias=True, chunk_rows=1000)),
        ("sampled_nolabels_k256", dict(N=2048, d=1280, V=V, k=256, kind="sampled", labels=False,
                                       weights=(1.0, 0.0))),
        ("kd_only_backward_recompute", dict(N=2048, d=1280, V=V, k=64, weights=(1.0, 0.0))),
    ]
    oks = [check_case(name, **kw) for name, kw in cases]
    return all(oks)


# ---------------------------------------------------------------------------- timing
def cuda_time(fn, warmup=1, reps=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times), times


def peak_extra(fn, p) -> float:
    """Peak bytes above the inputs during one step, minus the bf16 grads of h and W, in GiB."""
    torch.cuda.synchronize()
    p["h"].grad = None
    p["W"].grad = None
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    grads = p["h"].numel() * p["h"].element_size() + p["W"].numel() * p["W"].element_size()
    return (peak - base - grads) / GIB


def matmul_rate(n=8192, reps=10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms, _ = cuda_time(lambda: torch.mm(a, b), warmup=3, reps=reps)
    return 2 * n**3 / (ms / 1e3) / 1e12


def _sustained_rate(n=8192, reps=300) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms, _ = cuda_time(lambda: [torch.mm(a, b) for _ in range(reps)], warmup=1, reps=2)
    return 2 * n**3 * reps / (ms / 1e3) / 1e12


def _logits_rate(h: torch.Tensor, W: torch.Tensor) -> float:
    out = torch.empty(h.shape[0], W.shape[0], device="cuda", dtype=h.dtype)
    ms, _ = cuda_time(lambda: torch.mm(h, W.T, out=out), warmup=1, reps=3)
    return 2 * h.shape[0] * h.shape[1] * W.shape[0] / (ms / 1e3) / 1e12


def matmul_rates(h: torch.Tensor, W: torch.Tensor) -> dict:
    """bf16 matmul rate three ways, in TFLOP/s: 8192^3 in a short burst (10 products: the floor
    the issue names), 8192^3 sustained for ~0.4 s (as long as one headline step: clocks settle),
    and the logits product h @ W^T at the benchmark's own shape (one [N, V] output)."""
    rates = dict(burst_8192=matmul_rate(), sustained_8192=_sustained_rate(),
                 logits_at_shape=_logits_rate(h.detach(), W.detach()))
    torch.cuda.empty_cache()
    return {k: round(v, 1) for k, v in rates.items()}


def step_ours(p, tail="renormalize", chunk_rows=None):
    def fn():
        p["h"].grad = None
        p["W"].grad = None
        kd, ce = fused_sparse_kl(p["h"], p["W"], p["ids"], p["lp"], p["labels"], tail=tail,
                                 chunk_rows=chunk_rows)
        (0.5 * kd + 0.5 * ce).backward()
    return fn


def step_reference(p):
    def fn():
        p["h"].grad = None
        p["W"].grad = None
        kd, ce = fused_sparse_kl(p["h"], p["W"], p["ids"], p["lp"], p["labels"], impl="reference")
        (0.5 * kd + 0.5 * ce).backward()
    return fn


def step_dense(p):
    def fn():
        p["h"].grad = None
        p["W"].grad = None
        z = (p["h"] @ p["W"].T).float()
        logp = torch.log_softmax(z, dim=1)
        q_log = torch.log_softmax(p["lp"], dim=1)
        active = p["labels"] != -100
        kd_rows = (q_log.exp() * (q_log - logp.gather(1, p["ids"].long()))).sum(1)
        ce_rows = -logp.gather(1, p["labels"].clamp_min(0)[:, None])[:, 0]
        n = active.sum()
        loss = 0.5 * (kd_rows * active).sum() / n + 0.5 * (ce_rows * active).sum() / n
        loss.backward()
    return fn


def _chunk_topk_kl(hc, W, ids, lp, lab):
    logp = torch.log_softmax((hc @ W.T).float(), dim=1)
    q_log = torch.log_softmax(lp, dim=1)
    active = lab != -100
    kd = ((q_log.exp() * (q_log - logp.gather(1, ids))).sum(1) * active).sum()
    ce = (-logp.gather(1, lab.clamp_min(0)[:, None])[:, 0] * active).sum()
    return kd, ce


def step_compiled_chunked(p, chunk=4096):
    """torch.compile of a chunked top-k KL + CE, each chunk checkpointed (memory bounded)."""
    from torch.utils.checkpoint import checkpoint

    compiled = torch.compile(_chunk_topk_kl, dynamic=False)
    ids = p["ids"].long()

    def fn():
        p["h"].grad = None
        p["W"].grad = None
        N = p["h"].shape[0]
        kd = ce = 0.0
        for r0 in range(0, N, chunk):
            r1 = min(N, r0 + chunk)
            k_, c_ = checkpoint(compiled, p["h"][r0:r1], p["W"], ids[r0:r1], p["lp"][r0:r1],
                                p["labels"][r0:r1], use_reentrant=False)
            kd = kd + k_
            ce = ce + c_
        n = (p["labels"] != -100).sum()
        (0.5 * kd / n + 0.5 * ce / n).backward()
    return fn


def step_liger(p):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def fn():
        p["h"].grad = None
        p["W"].grad = None
        loss = liger_fused_linear_cross_entropy(p["h"], p["W"], p["labels"].long())
        loss.backward()
    return fn


def step_matmuls_only(p, chunk_rows, out="fp32"):
    """The three cuBLAS products of our pipeline with no Triton kernel: its matmul floor.
    out "bf16": dW accumulated in bf16 (Liger's way) instead of fp32."""
    from kdcache.kernels.sparse_kl_triton import _accumulate_fp32

    h, W = p["h"].detach(), p["W"].detach()
    N, d = h.shape
    V = W.shape[0]

    def fn():
        buf = torch.empty(chunk_rows, V, dtype=h.dtype, device=h.device)
        dh = torch.empty_like(h)
        dt = torch.float32 if out == "fp32" else h.dtype
        dW = torch.zeros(V, d, dtype=dt, device=h.device)
        for r0 in range(0, N, chunk_rows):
            r1 = min(N, r0 + chunk_rows)
            lg = buf[: r1 - r0]
            torch.mm(h[r0:r1], W.T, out=lg)
            torch.mm(lg, W, out=dh[r0:r1])
            _accumulate_fp32(dW, lg.T, h[r0:r1])
        return dW.to(W.dtype)
    return fn


def time_method(method, shape, fn, p, reps, warmup=1, extra=None):
    rec = dict(bench="kernels_time", date=DATE, gpu="NVIDIA H200 (lent)", method=method, **shape)
    try:
        ms, all_ms = cuda_time(fn, warmup=warmup, reps=reps)
        rec.update(ms=round(ms, 2), all_ms=[round(t, 2) for t in all_ms],
                   extra_peak_gib=round(peak_extra(fn, p), 3))
    except torch.cuda.OutOfMemoryError as e:
        rec.update(error=f"out of memory: {str(e)[:120]}")
    except Exception as e:  # a baseline that cannot run here is reported, not fatal
        rec.update(error=f"{type(e).__name__}: {str(e)[:200]}")
    if extra:
        rec.update(extra)
    p["h"].grad = None
    p["W"].grad = None
    torch.cuda.empty_cache()
    emit(rec)
    return rec


def run_timing(budget_s: float, grid: bool, baselines: bool) -> None:
    t_start = time.time()
    s = HEADLINE
    p = make_inputs(**s, dtype=torch.bfloat16, device="cuda", seed=1)
    rates = matmul_rates(p["h"], p["W"])
    rate = rates["burst_8192"]
    emit(dict(bench="kernels_matmul_rate", date=DATE, gpu=torch.cuda.get_device_name(), shape="8192^3 bf16",
              tflops=rate, rates_tflops=rates))
    floor_ms = 6 * s["N"] * s["d"] * s["V"] / (rate * 1e12) * 1e3
    p["h"].requires_grad_()
    p["W"].requires_grad_()
    ours = time_method("fused_sparse_kl (triton)", s, step_ours(p), p, reps=5,
                       extra=dict(floor_ms_6NdV=round(floor_ms, 1)))
    from kdcache.kernels import sparse_kl_triton as st

    summary = dict(bench="kernels", date=DATE, gpu="NVIDIA H200 (lent)", **s, matmul_tflops=round(rate, 1),
                   floor_ms=round(floor_ms, 1), ours_ms=ours.get("ms"),
                   ours_extra_peak_gib=ours.get("extra_peak_gib"),
                   knobs=dict(lse_group=st.LSE_GROUP,
                              block_v=st.KERNEL_BLOCK_V, num_warps=st.KERNEL_NUM_WARPS,
                              chunk_rows=st.CHUNK_ROWS or st.default_chunk_rows(s["N"], s["V"], 2, s["d"])))
    if ours.get("extra_peak_gib") is not None:  # the fp32 dW counted whole (the accounting)
        summary["ours_extra_peak_fp32dw_gib"] = round(ours["extra_peak_gib"] + s["V"] * s["d"] * 2 / GIB, 3)
    if ours.get("ms"):
        summary["ours_over_floor"] = round(ours["ms"] / floor_ms, 3)
        summary["rates_tflops"] = rates
        summary["ours_over_floor_by_rate"] = {
            k: round(ours["ms"] / (6 * s["N"] * s["d"] * s["V"] / (r * 1e12) * 1e3), 3) for k, r in rates.items()}
    if baselines:
        from kdcache.kernels.sparse_kl_triton import default_chunk_rows

        C = st.CHUNK_ROWS or default_chunk_rows(s["N"], s["V"], 2, s["d"])
        mm = time_method("cuBLAS matmuls only (our chunking)", s, step_matmuls_only(p, C), p, reps=3)
        summary["matmuls_only_ms"] = mm.get("ms")
        lig = time_method("liger fused linear CE (CE only)", s, step_liger(p), p, reps=3)
        summary["liger_ce_ms"] = lig.get("ms")
        comp = time_method("torch.compile chunked top-k KL+CE (checkpointed)", s, step_compiled_chunked(p), p,
                           reps=3, warmup=2)
        summary["compile_ms"] = comp.get("ms")
        summary["compile_extra_peak_gib"] = comp.get("extra_peak_gib")
        if comp.get("ms") and ours.get("ms"):
            summary["speedup_vs_compile"] = round(comp["ms"] / ours["ms"], 3)
        summary["ours_tail_bucket_ms"] = time_method("fused_sparse_kl (triton) tail=bucket", s,
                                                     step_ours(p, tail="bucket"), p, reps=3).get("ms")
    del p
    torch.cuda.empty_cache()
    emit(summary)
    if baselines and time.time() - t_start < budget_s:
        s16 = dict(N=16384, d=1280, V=202048, k=64)
        p = make_inputs(**s16, dtype=torch.bfloat16, device="cuda", seed=2)
        p["h"].requires_grad_()
        p["W"].requires_grad_()
        time_method("fused_sparse_kl (triton)", s16, step_ours(p), p, reps=5)
        time_method("dense PyTorch (N x V logits)", s16, step_dense(p), p, reps=3)
        time_method("reference (chunked PyTorch, fp32 math)", s16, step_reference(p), p, reps=2)
        time_method("liger fused linear CE (CE only)", s16, step_liger(p), p, reps=3)
        del p
        torch.cuda.empty_cache()
    if grid:
        for N in (16384, 131072):
            for d in (1280, 4096):
                for k in (16, 64, 256):
                    if time.time() - t_start > budget_s:
                        emit(dict(bench="kernels_time", skipped="time budget", N=N, d=d, k=k))
                        continue
                    if (N, d, k) == (131072, 1280, 64) or (N, d, k) == (16384, 1280, 64) and baselines:
                        continue
                    sh = dict(N=N, d=d, V=202048, k=k)
                    p = make_inputs(**sh, dtype=torch.bfloat16, device="cuda", seed=3)
                    p["h"].requires_grad_()
                    p["W"].requires_grad_()
                    time_method("fused_sparse_kl (triton)", sh, step_ours(p), p, reps=3,
                                extra=dict(floor_ms_6NdV=round(6 * N * d * 202048 / (rate * 1e12) * 1e3, 1)))
                    del p
                    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- variants
# Each variant sets sparse_kl_triton's knobs; "chunk_rows" None = the memory-budget default.
# Knob settings of sparse_kl_triton to check and time side by side ("chunk_rows" None = the
# memory-budget default). Tried and dropped on 2026-11-29 (docs/kernels.md has the numbers): the
# Triton kernel on a side stream overlapping the matmuls (2 or 4 row blocks per chunk, stream
# priorities, cuBLAS SM carve-out of 8 or 16), a transposed fp32 dW accumulator, persistent grids.
VARIANT_SETS = {
    "tuning": [
        dict(name="default"),
        dict(name="group1", lse_group=1),
        dict(name="c3072", chunk_rows=3072),
        dict(name="c4096", chunk_rows=4096),
        dict(name="group8_bv8192", block_v=8192),
        dict(name="default_again"),
        dict(name="group1_again", lse_group=1),
    ],
}


_KNOB_DEFAULTS: dict = {}


def apply_variant(v: dict) -> None:
    """Set sparse_kl_triton's knobs to v's values, the module's own defaults for the rest."""
    from kdcache.kernels import sparse_kl_triton as st

    knobs = dict(lse_group="LSE_GROUP", block_v="KERNEL_BLOCK_V", num_warps="KERNEL_NUM_WARPS",
                 chunk_rows="CHUNK_ROWS")
    if not _KNOB_DEFAULTS:
        _KNOB_DEFAULTS.update({k: getattr(st, attr) for k, attr in knobs.items()})
    for k, attr in knobs.items():
        setattr(st, attr, v.get(k, _KNOB_DEFAULTS[k]))


def run_variants(variant_set: str = "tuning") -> dict:
    """Correctness (vs one float64 reference) and headline timing of each entry of a VARIANT_SETS
    set, then the cuBLAS products alone per chunk size. Returns the fastest correct entry whose
    extra memory (fp32 dW counted whole) is <= 2 GiB; the defaults stay applied."""
    VARIANTS = VARIANT_SETS[variant_set]
    V = HEADLINE["V"]
    p = make_inputs(N=6000, d=1280, V=V, k=64, dtype=torch.bfloat16, device="cuda", seed=11)
    ref = {}
    h = p["h"].double().requires_grad_()
    W = p["W"].double().requires_grad_()
    kd, ce = fused_sparse_kl(h, W, p["ids"], p["lp"], p["labels"], impl="reference")
    (0.5 * kd + 0.5 * ce).backward()
    ref = dict(kd=kd.item(), ce=ce.item(), dh=h.grad, dW=W.grad)
    del h, W
    ok = {}
    for v in VARIANTS:
        apply_variant(v)
        h = p["h"].clone().requires_grad_()
        W = p["W"].clone().requires_grad_()
        kd, ce = fused_sparse_kl(h, W, p["ids"], p["lp"], p["labels"], chunk_rows=(v.get("chunk_rows") or 2560) - 60)
        (0.5 * kd + 0.5 * ce).backward()
        rec = dict(bench="kernels_variant_check", variant=v["name"],
                   kd_rel_err=abs(kd.item() - ref["kd"]) / abs(ref["kd"]),
                   ce_rel_err=abs(ce.item() - ref["ce"]) / abs(ref["ce"]),
                   dh_rel_err=rel(h.grad, ref["dh"]), dW_rel_err=rel(W.grad, ref["dW"]))
        rec["ok"] = bool(rec["kd_rel_err"] <= 1e-3 and rec["ce_rel_err"] <= 1e-3 and rec["dh_rel_err"] <= 1e-2
                         and rec["dW_rel_err"] <= 1e-2)
        ok[v["name"]] = rec["ok"]
        emit(rec)
        del h, W
    del p, ref
    torch.cuda.empty_cache()

    rate = matmul_rate()
    s = HEADLINE
    floor_ms = 6 * s["N"] * s["d"] * s["V"] / (rate * 1e12) * 1e3
    p = make_inputs(**s, dtype=torch.bfloat16, device="cuda", seed=1)
    p["h"].requires_grad_()
    p["W"].requires_grad_()
    times = {}
    for v in VARIANTS:
        apply_variant(v)
        r = time_method(f"variant {v['name']}", s, step_ours(p), p, reps=7,
                        extra=dict(variant=v, matmul_tflops=round(rate, 1), floor_ms_6NdV=round(floor_ms, 1)))
        if r.get("ms"):
            r["extra_peak_fp32dw_gib"] = round(r["extra_peak_gib"] + s["V"] * s["d"] * 2 / GIB, 3)
            times[v["name"]] = (r["ms"], r["extra_peak_fp32dw_gib"])
    # the cuBLAS products alone, per chunk size, and with Liger's bf16 dW accumulation
    for C, out in ((2048, "fp32"), (2304, "fp32"), (2560, "fp32"), (3072, "fp32"), (4096, "fp32"),
                   (2048, "bf16")):
        time_method(f"matmuls only C={C} dW {out}", s, step_matmuls_only(p, C, out=out), p, reps=5)
    del p
    torch.cuda.empty_cache()
    good = [v for v in VARIANTS if ok.get(v["name"]) and v["name"] in times and times[v["name"]][1] <= 2.0]
    best = min(good, key=lambda v: times[v["name"]][0]) if good else VARIANTS[0]
    apply_variant({})  # --time after this measures the committed defaults
    print("\nvariant                          ms    x floor  peak GiB (fp32 dW whole)  ok")
    for v in VARIANTS:
        ms, pk = times.get(v["name"], (float("nan"), float("nan")))
        print(f"{v['name']:30s} {ms:8.1f} {ms / floor_ms:7.3f} {pk:8.3f}  {ok.get(v['name'])}")
    emit(dict(bench="kernels_variants", date=DATE, gpu=torch.cuda.get_device_name(), matmul_tflops=round(rate, 1),
              floor_ms=round(floor_ms, 1), best=best["name"],
              ms={k: t[0] for k, t in times.items()}))
    return best


# ---------------------------------------------------------------------------- profile
def run_profile() -> None:
    """Where the headline step's time goes: torch.profiler kernel table, and each stage of one
    chunk timed alone for a few chunk sizes / kernel settings (multiplied up to N rows)."""
    from kdcache.kernels import sparse_kl_triton as st

    s = HEADLINE
    p = make_inputs(**s, dtype=torch.bfloat16, device="cuda", seed=1)
    p["h"].requires_grad_()
    p["W"].requires_grad_()
    fn = step_ours(p)
    for group in (1, 8):
        st.LSE_GROUP = group
        ms, _ = cuda_time(fn, reps=5)
        emit(dict(bench="kernels_profile", date=DATE, gpu="NVIDIA H200 (lent)", step="headline fwd+bwd",
                  lse_group=group, ms=round(ms, 2)))
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=90))
    p["h"].grad = None
    p["W"].grad = None
    h, W, ids, lp, lab = p["h"].detach(), p["W"].detach(), p["ids"], p["lp"], p["labels"].clamp_min(0)
    N, d = h.shape
    V = W.shape[0]
    dW = torch.zeros(V, d, dtype=torch.float32, device="cuda")
    for C in (2048,):
        buf = torch.empty(C, V, dtype=h.dtype, device="cuda")
        dh = torch.empty(C, d, dtype=h.dtype, device="cuda")
        hc = h[:C]
        kd_w = torch.full((C,), 1.0 / N, device="cuda")
        out = torch.empty(C, device="cuda")
        scale = N / C
        st_ms = {}
        st_ms["logits_mm"] = cuda_time(lambda: torch.mm(hc, W.T, out=buf), reps=5)[0]
        for bv, nw, tm in ((4096, 16, 1), (4096, 16, 8), (4096, 16, 4), (8192, 16, 8), (4096, 8, 8),
                           (8192, 32, 8)):
            def kern():
                st._sparse_kl_rows_kernel[(C,)](
                    buf, buf.stride(0), ids, ids.stride(0), lp, lp.stride(0), lab, kd_w, kd_w, out, out,
                    C, V, ids.shape[1], 1.0, 1.0, 1e-6, BLOCK_V=bv, BLOCK_K=64, BUCKET=False, HAS_CE=True,
                    SEPARATE_CE_LSE=False, WRITE_GRAD=True, GROUP=tm, num_warps=nw)
            st_ms[f"kernel_bv{bv}_w{nw}_group{tm}"] = cuda_time(kern, reps=5)[0]
        st_ms["dh_mm"] = cuda_time(lambda: torch.mm(buf, W, out=dh), reps=5)[0]
        st_ms["dW_addmm_fp32"] = cuda_time(lambda: st._accumulate_fp32(dW, buf.T, hc), reps=5)[0]
        st_ms["dW_mm_bf16"] = cuda_time(lambda: torch.mm(buf.T, hc), reps=5)[0]
        emit(dict(bench="kernels_profile", date=DATE, gpu="NVIDIA H200 (lent)", chunk_rows=C,
                  per_chunk_ms={k: round(v, 3) for k, v in st_ms.items()},
                  scaled_to_N_ms={k: round(v * scale, 1) for k, v in st_ms.items()}))
        del buf
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- CPU
def run_cpu() -> None:
    """CPU smoke benchmark (the development machine): reference vs dense PyTorch, small shape."""
    s = dict(N=1024, d=128, V=8192, k=64)
    p = make_inputs(**s, dtype=torch.float32, device="cpu", seed=0)
    p["h"].requires_grad_()
    p["W"].requires_grad_()

    def wall(fn, reps=3):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    ref_ms = wall(step_reference(p))
    dense_ms = wall(step_dense(p))
    emit(dict(bench="kernels", machine="cpu", **s, reference_ms=round(ref_ms, 1), dense_ms=round(dense_ms, 1),
              ratio_reference_over_dense=round(ref_ms / dense_ms, 2),
              note="CPU smoke run; the GPU figures come from --check/--time on the lent H200"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="bf16 Triton vs float64 reference on CUDA")
    ap.add_argument("--time", action="store_true", help="timing: headline, baselines, grid")
    ap.add_argument("--profile", action="store_true", help="per-stage timing of the headline step")
    ap.add_argument("--variants", choices=sorted(VARIANT_SETS), default=None,
                    help="check and time a set of the kernel's knob settings, then keep the fastest for --time")
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new timings after this")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        if args.check or args.time or args.variants:
            print("--check/--time need CUDA", file=sys.stderr)
            return 2
        run_cpu()
        return 0
    ok = True
    if args.variants:
        run_variants(args.variants)
    if args.check:
        ok = run_checks()
    if args.profile:
        run_profile()
    if args.time:
        run_timing(args.budget_s, grid=not args.no_grid, baselines=not args.no_baselines)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
