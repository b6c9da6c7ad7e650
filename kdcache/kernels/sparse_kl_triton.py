"""Triton implementation of the fused linear sparse-KL loss (math: sparse_kl_reference.py).

Per chunk of C rows (C chosen so that fp32 dW + the logits buffer fit MEMORY_BUDGET_BYTES):

    logits = h_c @ W^T (+ b)                 cuBLAS, 2 C d V flops, into one reused [C, V] buffer
    _sparse_kl_rows_kernel                   Triton, one program per row:
        A. online logsumexp of z/T (and of z for CE when T != 1), running max/sum per group
        B. gather z at the target ids and the label -> per-row KD and CE losses
        C. overwrite the row in place with its dense gradient  a*dense_kd*p_T(v) + c*p_1(v)
        D. overwrite the target ids (and the label) with their full gradient values
    dh_c  = G @ W                            cuBLAS, 2 C d V
    dW   += G^T @ h_c                        cuBLAS, 2 C d V, accumulated in fp32
    db   += G.sum(0)                         (only with a bias)

So the whole forward+backward is 6NdV matmul flops plus three passes over each logits chunk
(read, read, write); the logits never exist for more than C rows. Phase D recomputes each sparse
value from fp32 statistics (it does not add to the bf16 dense value), so ids must be distinct
within a row. Only pure `tl` math is used (log1p is written out), so the kernel also runs under
TRITON_INTERPRET=1 on CPU, where the tests drive it with fp32 tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kdcache.kernels.sparse_kl_reference import TAIL_EPS

# Memory budget for what the loss holds beyond h, W and their model-dtype gradients: the fp32 dW
# accumulator plus the logits buffer, kept under 2 GiB so the loss fits beside a large student.
# Chunks are whole multiples of CHUNK_ROW_MULTIPLE rows: at d=1280, V=202,048 that is 2,048 rows
# (0.96 GiB dW + 0.77 GiB logits = 1.73 GiB); larger chunks were not faster within 2 GiB
# (docs/kernels.md has the measurements). Users with memory to spare raise the budget with
# KDCACHE_SPARSE_KL_MEMORY_GIB (read at each call, `memory_budget_bytes`). Never below
# MIN_LOGITS_BUFFER_BYTES of logits (at d=4096 the fp32 dW alone is 3.1 GiB).
MEMORY_BUDGET_ENV = "KDCACHE_SPARSE_KL_MEMORY_GIB"
MEMORY_BUDGET_BYTES = int(1.95 * 2**30)
MIN_LOGITS_BUFFER_BYTES = 800 * 2**20
CHUNK_ROW_MULTIPLE = 1024
# Rows per chunk when the caller gives none (None: from the budget, default_chunk_rows).
CHUNK_ROWS: int | None = None
# Tests set this to fill every buffer the kernel should write with NaN first, so that an element
# left unwritten shows up as NaN instead of as a plausible stale value.
POISON_OUTPUTS = False
# Phase A keeps one running (max, sum) per group of LSE_GROUP adjacent elements (see the kernel):
# 8 costs 1.125 exps per element and one 16-byte load per group instead of two exps per element;
# the pass is bound by memory, so the gain is small (docs/kernels.md). KDCACHE_LSE_GROUP overrides
# it, read at each call.
LSE_GROUP_ENV = "KDCACHE_LSE_GROUP"
LSE_GROUP = 8
# Kernel launch shape: vocabulary tile and warps per program (one program per row). 8,192-wide
# tiles, 8 or 32 warps: all within noise of these.
KERNEL_BLOCK_V = 4096
KERNEL_NUM_WARPS = 16


@triton.jit
def _log1p(x):
    """log(1 + x) accurate for small |x| without libdevice: log(u) * x / (u - 1), u = 1 + x."""
    u = 1.0 + x
    du = u - 1.0
    safe = tl.where(du == 0.0, 1.0, du)
    return tl.where(du == 0.0, x, tl.log(u) * (x / safe))


@triton.jit
def _sparse_kl_rows_kernel(
    logits_ptr, stride_l,
    ids_ptr, stride_i, lp_ptr, stride_p, labels_ptr,
    kd_w_ptr, ce_w_ptr, kd_out_ptr, ce_out_ptr,
    n_rows, V, K, inv_T, T, tail_eps,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    BUCKET: tl.constexpr, HAS_CE: tl.constexpr, SEPARATE_CE_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, GROUP: tl.constexpr,
):
    # A grid-stride loop over rows: one program per row on CUDA (no persistent grid tried was
    # faster, docs/kernels.md), two programs under the CPU interpreter.
    for row_i in tl.range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.cast(row_i, tl.int64)  # 64-bit offsets: C * V can pass 2^31
        _sparse_kl_one_row(
            logits_ptr + row * stride_l, ids_ptr + row * stride_i, lp_ptr + row * stride_p,
            labels_ptr + row, kd_w_ptr + row, ce_w_ptr + row, kd_out_ptr + row, ce_out_ptr + row,
            V, K, inv_T, T, tail_eps,
            BLOCK_V, BLOCK_K, BUCKET, HAS_CE, SEPARATE_CE_LSE, WRITE_GRAD, GROUP,
        )


@triton.jit
def _sparse_kl_one_row(
    row_ptr, ids_row_ptr, lp_row_ptr, label_ptr, kd_w_ptr, ce_w_ptr, kd_out_ptr, ce_out_ptr,
    V, K, inv_T, T, tail_eps,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    BUCKET: tl.constexpr, HAS_CE: tl.constexpr, SEPARATE_CE_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, GROUP: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_V)

    # A. online logsumexp, one (max, sum) pair per group of GROUP adjacent elements. A group sits
    # in one thread's registers (the load is [BLOCK_V / GROUP, GROUP], contiguous along axis 1),
    # so its max is a register-local reduction and the rescale exp is paid once per group:
    # 1 + 1/GROUP exps per element (GROUP=1: the plain per-lane form, two exps per element).
    # -1e30 (not -inf) keeps empty groups NaN-free.
    gcols = tl.arange(0, BLOCK_V // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    m_t = tl.full([BLOCK_V // GROUP], -1e30, tl.float32)
    s_t = tl.zeros([BLOCK_V // GROUP], tl.float32)
    m_1 = tl.full([BLOCK_V // GROUP], -1e30, tl.float32)
    s_1 = tl.zeros([BLOCK_V // GROUP], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + gcols
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        zt = z * inv_T
        m_new = tl.maximum(m_t, tl.max(zt, 1))
        s_t = s_t * tl.exp(m_t - m_new) + tl.sum(tl.exp(zt - m_new[:, None]), 1)
        m_t = m_new
        if SEPARATE_CE_LSE:
            m1_new = tl.maximum(m_1, tl.max(z, 1))
            s_1 = s_1 * tl.exp(m_1 - m1_new) + tl.sum(tl.exp(z - m1_new[:, None]), 1)
            m_1 = m1_new
    M = tl.max(m_t, 0)
    lse_t = M + tl.log(tl.sum(s_t * tl.exp(m_t - M), 0))
    if SEPARATE_CE_LSE:
        M1 = tl.max(m_1, 0)
        lse_1 = M1 + tl.log(tl.sum(s_1 * tl.exp(m_1 - M1), 0))
    else:
        lse_1 = lse_t

    # B. gathers at the target ids / label, then the row's losses and gradient coefficients
    koffs = tl.arange(0, BLOCK_K)
    kmask = koffs < K
    ids = tl.load(ids_row_ptr + koffs, mask=kmask, other=-1).to(tl.int64)
    valid = ids >= 0
    t = tl.load(lp_row_ptr + koffs, mask=kmask, other=float("-inf")).to(tl.float32)
    t = tl.where(valid, t, float("-inf"))
    z_ids = tl.load(row_ptr + tl.where(valid, ids, 0), mask=valid, other=0.0).to(tl.float32)
    log_p_ids = z_ids * inv_T - lse_t
    if BUCKET:
        q = tl.where(valid, tl.exp(t), 0.0)
        Q = tl.sum(q, 0)
        q_tail = tl.maximum(1.0 - Q, 0.0)
        p_ids = tl.where(valid, tl.exp(log_p_ids), 0.0)
        P = tl.sum(p_ids, 0)
        clamped = P > 1.0 - tail_eps
        P_c = tl.where(clamped, 1.0 - tail_eps, P)
        log_tail_s = _log1p(-P_c)
        log_tail_t = _log1p(-tl.where(q_tail > 0, Q, 0.0))
        head = tl.sum(tl.where(q > 0, q * (t - log_p_ids), 0.0), 0)
        kd = head + tl.where(q_tail > 0, q_tail * (log_tail_t - log_tail_s), 0.0)
        r = tl.where(clamped, 0.0, q_tail / (1.0 - P_c))
        dense_kd = Q - r * P
        sparse_kd = tl.where(valid, r * p_ids - q, 0.0)
    else:
        tt = t * inv_T
        mq = tl.max(tt, 0)
        has_any = mq > -1e30
        mq_safe = tl.where(has_any, mq, 0.0)
        e = tl.where(valid, tl.exp(tt - mq_safe), 0.0)
        lse_q = mq_safe + tl.log(tl.where(has_any, tl.sum(e, 0), 1.0))
        log_q = tl.where(valid, tt - lse_q, 0.0)
        q = tl.where(valid, tl.exp(log_q), 0.0)
        kd = T * T * tl.sum(tl.where(q > 0, q * (log_q - log_p_ids), 0.0), 0)
        dense_kd = T * tl.sum(q, 0)
        sparse_kd = -T * q
    tl.store(kd_out_ptr, kd)
    if HAS_CE:
        label = tl.load(label_ptr).to(tl.int64)
        z_lab = tl.load(row_ptr + label).to(tl.float32)
        tl.store(ce_out_ptr, lse_1 - z_lab)

    if WRITE_GRAD:
        a = tl.load(kd_w_ptr)
        cd_kd = a * dense_kd
        if HAS_CE:
            c = tl.load(ce_w_ptr)
        tl.debug_barrier()  # every gather above must read logits before phase C overwrites them
        # C. dense gradient, in place
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            cmask = cols < V
            z = tl.load(row_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            if SEPARATE_CE_LSE:
                g = cd_kd * tl.exp(z * inv_T - lse_t) + c * tl.exp(z - lse_1)
            elif HAS_CE:  # T == 1: p_T == p_1, one exp
                g = (cd_kd + c) * tl.exp(z - lse_t)
            else:
                g = cd_kd * tl.exp(z * inv_T - lse_t)
            tl.store(row_ptr + cols, g.to(row_ptr.dtype.element_ty), mask=cmask)
        tl.debug_barrier()  # phase D overwrites elements phase C wrote from other threads
        # D. sparse entries: full value recomputed in fp32
        g_ids = cd_kd * tl.exp(log_p_ids) + a * sparse_kd
        if HAS_CE:
            g_ids += c * tl.exp(z_ids - lse_1) - tl.where(ids == label, c, 0.0)
            lab_in = tl.sum((ids == label).to(tl.int32), 0) > 0
            g_lab = cd_kd * tl.exp(z_lab * inv_T - lse_t) + c * tl.exp(z_lab - lse_1) - c
            tl.store(row_ptr + label, g_lab.to(row_ptr.dtype.element_ty), mask=lab_in == 0)
        tl.store(row_ptr + tl.where(valid, ids, 0), g_ids.to(row_ptr.dtype.element_ty), mask=valid)


def memory_budget_bytes() -> int:
    """MEMORY_BUDGET_BYTES, or KDCACHE_SPARSE_KL_MEMORY_GIB GiB when that is set."""
    env = os.environ.get(MEMORY_BUDGET_ENV)
    return int(float(env) * 2**30) if env else MEMORY_BUDGET_BYTES


def lse_group() -> int:
    """LSE_GROUP, or KDCACHE_LSE_GROUP when that is set."""
    env = os.environ.get(LSE_GROUP_ENV)
    return int(env) if env else LSE_GROUP


def default_chunk_rows(n_rows: int, vocab: int, itemsize: int, dim: int = 0, want_grads: bool = True) -> int:
    """Rows per chunk so that fp32 dW (when gradients are wanted) plus the logits buffer fit
    MEMORY_BUDGET_BYTES, at least MIN_LOGITS_BUFFER_BYTES of logits, a multiple of
    CHUNK_ROW_MULTIPLE rows where possible."""
    dw_bytes = vocab * dim * 4 if want_grads else 0
    buffer_bytes = max(MIN_LOGITS_BUFFER_BYTES, memory_budget_bytes() - dw_bytes)
    rows = max(16, buffer_bytes // (vocab * itemsize))
    if rows >= CHUNK_ROW_MULTIPLE:
        rows = rows // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
    return max(1, min(n_rows, rows))


_FP32_ADDMM_OK: bool | None = None  # whether this torch has addmm(..., out_dtype=) for these operands


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with fp32 accumulation and output, whatever the dtype of a and b."""
    global _FP32_ADDMM_OK
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if _FP32_ADDMM_OK is not False and a.is_cuda:
        try:  # bf16/fp16 operands, fp32 C matrix read and written by cuBLAS (torch >= 2.8)
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _FP32_ADDMM_OK = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_ADDMM_OK = False
    # Fallback (CPU interpreter runs, old torch): upcast a bounded slab of rows at a time.
    step = max(1, (64 * 2**20) // max(1, a.shape[1] * 4))
    bf = b.to(acc.dtype)
    for r0 in range(0, a.shape[0], step):
        acc[r0 : r0 + step].addmm_(a[r0 : r0 + step].to(acc.dtype), bf)


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
    block_v: int | None = None,
    num_warps: int | None = None,
    programs: int | None = None,
):
    """Same contract as sparse_kl_reference.loss_and_grads: per-row losses [N] (fp32) and, when
    kd_weight is given, dh [N, d] (hidden's dtype), dW [V, d] (fp32), db [V] (fp32) of
    sum_n kd_weight[n] KD_n + ce_weight[n] CE_n."""
    N, d = hidden.shape
    V = weight.shape[0]
    K = target_ids.shape[1]
    dev = hidden.device
    want = kd_weight is not None
    has_ce = labels is not None
    T = float(temperature)
    C = chunk_rows or CHUNK_ROWS or default_chunk_rows(N, V, hidden.element_size(), d, want)
    C = max(1, min(C, N))
    BLOCK_V = block_v or max(16, min(KERNEL_BLOCK_V, triton.next_power_of_2(V)))
    num_warps = num_warps or KERNEL_NUM_WARPS
    BLOCK_K = max(2, triton.next_power_of_2(K))
    group = max(1, min(lse_group(), BLOCK_V // 2))  # at least two groups per tile
    if programs is None:  # one program per row on CUDA (measured best); the CPU tests use the loop
        programs = C if dev.type == "cuda" else 2

    ids = target_ids.contiguous()
    lp = target_logprobs.to(torch.float32).contiguous()
    lab = labels.to(torch.int64).contiguous() if has_ce else ids  # dummy pointer without CE
    kd_w = kd_weight.to(torch.float32).contiguous() if want else lp
    if want and has_ce and ce_weight is not None:
        ce_w = ce_weight.to(torch.float32).contiguous()
    else:
        ce_w = torch.zeros(N, dtype=torch.float32, device=dev)
    kd_rows = torch.empty(N, dtype=torch.float32, device=dev)
    ce_rows = torch.empty(N, dtype=torch.float32, device=dev) if has_ce else kd_rows
    buf = torch.empty(C, V, dtype=hidden.dtype, device=dev)
    dh = torch.empty_like(hidden) if want else None
    dW = torch.zeros(V, d, dtype=torch.float32, device=dev) if want else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if (want and bias is not None) else None
    if POISON_OUTPUTS:
        for t in (kd_rows, ce_rows, buf, dh):
            if t is not None:
                t.fill_(float("nan"))
    w_t = weight.T
    for r0 in range(0, N, C):
        r1 = min(N, r0 + C)
        n = r1 - r0
        logits = buf[:n]
        hc = hidden[r0:r1]
        if bias is None:
            torch.mm(hc, w_t, out=logits)
        else:
            torch.addmm(bias, hc, w_t, out=logits)
        _sparse_kl_rows_kernel[(min(n, programs),)](
            logits, logits.stride(0),
            ids[r0:r1], ids.stride(0), lp[r0:r1], lp.stride(0), lab[r0:r1] if has_ce else lab,
            kd_w[r0:r1] if want else kd_w, ce_w[r0:r1], kd_rows[r0:r1], ce_rows[r0:r1] if has_ce else kd_rows,
            n, V, K, 1.0 / T, T, TAIL_EPS,
            BLOCK_V=BLOCK_V, BLOCK_K=BLOCK_K, BUCKET=(tail == "bucket"), HAS_CE=has_ce,
            SEPARATE_CE_LSE=(has_ce and T != 1.0), WRITE_GRAD=want, GROUP=group,
            num_warps=num_warps,
        )
        if want:
            torch.mm(logits, weight, out=dh[r0:r1])
            _accumulate_fp32(dW, logits.T, hc)
            if db is not None:
                db += logits.sum(dim=0, dtype=torch.float32)
    return kd_rows, (ce_rows if has_ce else None), dh, dW, db
