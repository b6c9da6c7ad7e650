"""Prototype for kernels issue follow-up: can a Triton logits product carry the row statistics?

The fused sparse-KL step spends ~35-40 ms of its 358 ms (H200, headline shape) in three passes of
the Triton row kernel over each chunk of bf16 logits. Pass A (row max and sum of exps) could ride
in the epilogue of the logits product h_c @ W^T if that product were a Triton kernel instead of
cuBLAS. This script measures what that would cost: for one 2,048-row chunk at d=1,280,
V=202,048 it times cuBLAS alone, a plain Triton matmul, and the Triton matmul that also writes
per-(row, column-tile) max and sum-of-exps partials, for a few tile configurations, and checks
the partials reproduce torch.logsumexp. It prints one JSON line per configuration and a summary.

    python3 bench/proto_fused_logits.py      # CUDA only
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _logits_kernel(h_ptr, w_ptr, out_ptr, pmax_ptr, psum_ptr, M, N, K,
                   stride_hm, stride_wn, stride_om, n_tiles_n,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                   STATS: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = h_ptr + rm[:, None].to(tl.int64) * stride_hm + rk[None, :]
    b_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0.0)
        b = tl.load(b_ptrs, mask=(rn[None, :] < N) & (rk[:, None] + k0 < K), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK
    out = acc.to(out_ptr.dtype.element_ty)
    o_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(o_ptrs, out, mask=(rm[:, None] < M) & (rn[None, :] < N))
    if STATS:
        # statistics of the values the row kernel would read back (the bf16-rounded logits)
        z = tl.where(rn[None, :] < N, out.to(tl.float32), float("-inf"))
        mx = tl.max(z, 1)
        sm = tl.sum(tl.exp(z - mx[:, None]), 1)
        tl.store(pmax_ptr + rm * n_tiles_n + pid_n, mx, mask=rm < M)
        tl.store(psum_ptr + rm * n_tiles_n + pid_n, sm, mask=rm < M)


def run(h, W, out, BM, BN, BK, GROUP_M, warps, stages, stats):
    M, K = h.shape
    N = W.shape[0]
    n_tiles_n = triton.cdiv(N, BN)
    pmax = torch.empty(M, n_tiles_n, device=h.device, dtype=torch.float32)
    psum = torch.empty_like(pmax)
    grid = (triton.cdiv(M, BM) * n_tiles_n,)

    def fn():
        _logits_kernel[grid](h, W, out, pmax, psum, M, N, K, h.stride(0), W.stride(0), out.stride(0),
                             n_tiles_n, BM=BM, BN=BN, BK=BK, GROUP_M=GROUP_M, STATS=stats,
                             num_warps=warps, num_stages=stages)
    return fn, pmax, psum


def main() -> int:
    if not torch.cuda.is_available():
        print("CUDA only", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    C, d, V = 2048, 1280, 202048
    h = torch.randn(C, d, device="cuda").bfloat16()
    W = (torch.randn(V, d, device="cuda") / d**0.5).bfloat16()
    out = torch.empty(C, V, device="cuda", dtype=torch.bfloat16)
    flops = 2 * C * d * V
    results = []

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "proto_fused_logits.jsonl"), "a") as f:
                f.write(line + "\n")
        results.append(rec)

    ms = triton.testing.do_bench(lambda: torch.mm(h, W.T, out=out), warmup=50, rep=300,
                                 return_mode="median")
    emit(dict(bench="proto_fused_logits", impl="cublas", ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1)))
    ref = out.float()
    ref_lse = torch.logsumexp(ref, dim=1)
    configs = [(128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4),
               (128, 128, 64, 8, 8, 4), (256, 128, 64, 8, 8, 3), (128, 256, 32, 8, 8, 4),
               (64, 256, 64, 8, 4, 4)]
    for BM, BN, BK, G, warps, stages in configs:
        for stats in (False, True):
            try:
                fn, pmax, psum = run(h, W, out, BM, BN, BK, G, warps, stages, stats)
                out.fill_(float("nan"))
                fn()
                torch.cuda.synchronize()
                err = ((out.float() - ref).abs().max()).item()
                rec = dict(bench="proto_fused_logits", impl="triton", stats=stats, BM=BM, BN=BN, BK=BK,
                           group_m=G, warps=warps, stages=stages, max_abs_err_vs_cublas=err)
                if stats:
                    lse = pmax.max(1).values + torch.log((psum * torch.exp(pmax - pmax.max(1, keepdim=True).values)).sum(1))
                    rec["lse_max_abs_err"] = (lse - ref_lse).abs().max().item()
                ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
                rec.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))
            except Exception as e:  # a configuration that does not compile (shared memory) is reported
                rec = dict(bench="proto_fused_logits", impl="triton", stats=stats, BM=BM, BN=BN, BK=BK,
                           warps=warps, stages=stages, error=f"{type(e).__name__}: {str(e)[:160]}")
            emit(rec)
    # pass A of the row kernel on the same chunk: what the epilogue would replace
    from kdcache.kernels import sparse_kl_triton as st
    ids = torch.randint(0, V, (C, 64), device="cuda", dtype=torch.int32)
    lp = torch.full((C, 64), -5.0, device="cuda")
    lab = torch.randint(0, V, (C,), device="cuda")
    w = torch.full((C,), 1.0 / C, device="cuda")
    kd = torch.empty(C, device="cuda")
    for write in (False, True):
        def kern():
            st._sparse_kl_rows_kernel[(C,)](out, out.stride(0), ids, ids.stride(0), lp, lp.stride(0), lab, w, w,
                                            kd, kd, C, V, 64, 1.0, 1.0, 1e-6, BLOCK_V=4096, BLOCK_K=64,
                                            BUCKET=False, HAS_CE=True, SEPARATE_CE_LSE=False, WRITE_GRAD=write,
                                            GROUP=8, num_warps=16)
        out.copy_(ref.bfloat16())
        ms = triton.testing.do_bench(kern, warmup=20, rep=200, return_mode="median")
        emit(dict(bench="proto_fused_logits", impl="row_kernel", write_grad=write, ms=round(ms, 4),
                  gbytes_per_s=round((1 if not write else 3) * C * V * 2 / ms / 1e6, 1)))
    best = min((r for r in results if r.get("impl") == "triton" and r.get("stats") and "ms" in r),
               key=lambda r: r["ms"], default=None)
    emit(dict(bench="proto_fused_logits_summary", cublas_ms=results[0]["ms"],
              best_triton_with_stats=best, per_step_chunks=64))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main())
