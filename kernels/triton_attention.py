"""FlashAttention-2 style causal attention in Triton: forward, and backward from the saved logsumexp.

Layouts: q [B, Hq, S, D]; k, v [B, Hkv, S, D], any strides with a unit last-dim stride. Query head h
reads KV head h // (Hq // Hkv), addressed directly, so K/V are never repeated in memory. An optional
window w restricts query i to keys i - w < j <= i.

Every kernel splits its loop over the other sequence axis into three ranges so the hot middle range
runs without masks or bounds checks: [window edge (masked), fully visible (unmasked), diagonal (masked)].
Scores live in the log2 domain (exp2 is one instruction on GPUs); the saved logsumexp is natural-log.
This module must be imported only after TRITON_INTERPRET is decided (kernels are bound at import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _backend

LOG2E = 1.4426950408889634

# Tile sizes per (kernel, "wide" = 16-bit inputs). 16-bit tiles are multiples of the tensor-core
# MMA shapes and follow the Triton FlashAttention tutorial's A100/H100 choices; fp32/fp64 tiles are
# halved because their operands take twice the shared memory. Tests may replace entries (smaller
# tiles exercise more blocks per sequence under the interpreter).
# Constraints the range logic relies on: fwd/dq BLOCK_M % BLOCK_N == 0; dkdv BLOCK_N % BLOCK_M == 0.
CONFIGS = {
    ("fwd", True): dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    ("fwd", False): dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    ("dkdv", True): dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3),
    ("dkdv", False): dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
    ("dq", True): dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
    ("dq", False): dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=2),
}


# Under the interpreter tiles cost no shared memory but every loop iteration costs milliseconds.
INTERPRETER_CONFIGS = {
    "fwd": dict(BLOCK_M=128, BLOCK_N=64),
    "dkdv": dict(BLOCK_M=64, BLOCK_N=128),
    "dq": dict(BLOCK_M=128, BLOCK_N=64),
}


def _config(kind: str, dtype: torch.dtype, head_dim: int) -> dict:
    if _backend.interpreting():
        cfg = dict(INTERPRETER_CONFIGS[kind])
    else:
        cfg = dict(CONFIGS[(kind, dtype in (torch.float16, torch.bfloat16))])
        if head_dim == 128:
            cfg["num_warps"] = 8  # 128-wide accumulators need the extra registers
    outer, inner = ("BLOCK_N", "BLOCK_M") if kind == "dkdv" else ("BLOCK_M", "BLOCK_N")
    if cfg[outer] % cfg[inner] or min(cfg["BLOCK_M"], cfg["BLOCK_N"]) < 16:
        raise ValueError(f"attention {kind} tiles {cfg}: {outer} must be a multiple of {inner}, both >= 16")
    return cfg


# --------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, lo, hi,
               seq_len, window, qk_scale,
               MASK: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
               IDX: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N).to(IDX)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kt_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None]  # (D, BN)
        v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]  # (BN, D)
        if MASK:
            kt = tl.load(kt_ptrs, mask=offs_n[None, :] < seq_len, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
        if UPCAST:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=PREC) * qk_scale  # (BM, BN), log2 units
        if MASK:
            diff = offs_m[:, None] - offs_n[None, :]
            visible = (diff >= 0) & (diff < window) & (offs_n[None, :] < seq_len)
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row with nothing visible yet keeps m = -inf; shift by 0 instead to avoid inf - inf.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < seq_len, other=0.0)
        else:
            v = tl.load(v_ptrs)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
              stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
              num_q_heads, group, seq_len, window, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_q_heads).to(tl.int64)
    h = (pid_bh % num_q_heads).to(tl.int64)
    hk = h // group
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M).to(IDX)
    offs_d = tl.arange(0, HEAD_DIM).to(IDX)
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=offs_m[:, None] < seq_len,
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)

    # Key blocks: [lo, mid) touch the window's lower edge, [mid, start_m) are fully visible to every
    # row of this block, [start_m, hi) straddle the diagonal.
    lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
    mid = tl.minimum(tl.maximum(full_lo, lo), start_m)
    hi = tl.minimum(start_m + BLOCK_M, seq_len)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                               lo, mid, seq_len, window, qk_scale, True, BLOCK_N, UPCAST, PREC, IDX)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                               mid, start_m, seq_len, window, qk_scale, False, BLOCK_N, UPCAST, PREC, IDX)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                               start_m, hi, seq_len, window, qk_scale, True, BLOCK_N, UPCAST, PREC, IDX)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows past seq_len can have l == 0
    out = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) / 1.4426950408889634
    row_ok = offs_m < seq_len
    tl.store(LSE + pid_bh.to(tl.int64) * seq_len + offs_m, lse, mask=row_ok)
    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_ds,
               num_q_heads, seq_len,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr):
    # delta_i = sum_d dO_id * O_id, the row term of dS = P * (dP - delta).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_q_heads).to(tl.int64)
    h = (pid_bh % num_q_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(IDX)
    offs_d = tl.arange(0, HEAD_DIM).to(IDX)
    row_ok = offs_m < seq_len
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(ACC)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(ACC)
    tl.store(DELTA + pid_bh.to(tl.int64) * seq_len + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                offs_n, offs_d, lo, hi, seq_len, window, qk_scale,
                MASK: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                IDX: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M).to(IDX)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        qt_ptrs = q_base + offs_m[None, :] * stride_qs + offs_d[:, None]  # (D, BM)
        do_ptrs = do_base + offs_m[:, None] * stride_dos + offs_d[None, :]  # (BM, D)
        if MASK:
            row_ok = offs_m < seq_len
            qt = tl.load(qt_ptrs, mask=row_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            qt = tl.load(qt_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        if UPCAST:
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
        qkt = tl.dot(k, qt, input_precision=PREC) * qk_scale  # (BN, BM), log2 units
        pt = tl.math.exp2(qkt - lse[None, :] * 1.4426950408889634)
        if MASK:
            diff = offs_m[None, :] - offs_n[:, None]
            visible = (diff >= 0) & (diff < window) & (offs_m[None, :] < seq_len)
            pt = tl.where(visible, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)  # (BN, BM)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                   stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                   stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                   num_q_heads, num_kv_heads, group, seq_len, window, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr):
    # One program owns one key block of one KV head and sums over all query heads of its group,
    # so dk/dv need no atomics and GQA needs no repeated K/V.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    hk = (pid_bh % num_kv_heads).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N).to(IDX)
    offs_d = tl.arange(0, HEAD_DIM).to(IDX)
    col_ok = offs_n[:, None] < seq_len
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=col_ok, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=col_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)

    # Query blocks: [start_n, diag_hi) straddle the diagonal, [diag_hi, mid) see the whole key block,
    # [mid, hi) touch the window's upper edge (or the end of the sequence).
    hi = tl.minimum(seq_len, start_n + BLOCK_N + window - 1)
    diag_hi = tl.minimum(start_n + BLOCK_N, hi)
    mid = tl.minimum(((start_n + window) // BLOCK_M) * BLOCK_M, (seq_len // BLOCK_M) * BLOCK_M)
    mid = tl.maximum(mid, diag_hi)
    for g in range(group):
        h = hk * group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * num_q_heads + h) * seq_len
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
                             stride_qs, stride_dos, offs_n, offs_d, start_n, diag_hi,
                             seq_len, window, qk_scale, True, BLOCK_M, UPCAST, PREC, IDX)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
                             stride_qs, stride_dos, offs_n, offs_d, diag_hi, mid,
                             seq_len, window, qk_scale, False, BLOCK_M, UPCAST, PREC, IDX)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
                             stride_qs, stride_dos, offs_n, offs_d, mid, hi,
                             seq_len, window, qk_scale, True, BLOCK_M, UPCAST, PREC, IDX)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, lo, hi,
              seq_len, window, qk_scale,
              MASK: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
               IDX: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N).to(IDX)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kt_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None]  # (D, BN)
        vt_ptrs = v_base + offs_n[None, :] * stride_vs + offs_d[:, None]  # (D, BN)
        if MASK:
            kt = tl.load(kt_ptrs, mask=offs_n[None, :] < seq_len, other=0.0)
            vt = tl.load(vt_ptrs, mask=offs_n[None, :] < seq_len, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=PREC) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASK:
            diff = offs_m[:, None] - offs_n[None, :]
            visible = (diff >= 0) & (diff < window) & (offs_n[None, :] < seq_len)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                 stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                 stride_dqb, stride_dqh, stride_dqs,
                 num_q_heads, group, seq_len, window, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_q_heads).to(tl.int64)
    h = (pid_bh % num_q_heads).to(tl.int64)
    hk = h // group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M).to(IDX)
    offs_d = tl.arange(0, HEAD_DIM).to(IDX)
    row_ok = offs_m < seq_len
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = pid_bh.to(tl.int64) * seq_len
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)

    lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
    mid = tl.minimum(tl.maximum(full_lo, lo), start_m)
    hi = tl.minimum(start_m + BLOCK_M, seq_len)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                   lo, mid, seq_len, window, qk_scale, True, BLOCK_N, UPCAST, PREC, IDX)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                   mid, start_m, seq_len, window, qk_scale, False, BLOCK_N, UPCAST, PREC, IDX)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                   start_m, hi, seq_len, window, qk_scale, True, BLOCK_N, UPCAST, PREC, IDX)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------------
# launchers


def _flags(dtype: torch.dtype) -> dict:
    interp = _backend.interpreting()
    if dtype == torch.float32:
        # fp32 follows torch's matmul policy: TF32 tensor cores unless torch was told otherwise.
        prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 and not interp else "ieee"
    else:
        prec = "ieee" if dtype == torch.float64 else "tf32"  # ignored for 16-bit operands
    return dict(
        # The interpreter's bf16 arithmetic is wrong (bit patterns added as integers): compute in fp32.
        UPCAST=interp and dtype == torch.bfloat16,
        PREC=prec,
        ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        # The interpreter checks every int32 tile add/mul for overflow (milliseconds each); int64
        # index tiles skip the check. GPUs keep cheaper int32 tile offsets.
        IDX=tl.int64 if interp else tl.int32,
    )


def _window_arg(window: int, seq_len: int) -> int:
    return window if 0 < window < seq_len else seq_len  # seq_len: every causal key is in the window


def _check_grid(batch_heads: int) -> None:
    if batch_heads > 65535:  # CUDA's limit on the second grid axis
        raise ValueError(f"causal_attention (Triton): batch * heads = {batch_heads} exceeds 65535; "
                         "split the batch")


def _s(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last_stride(*tensors):
    # The public wrapper rejects these layouts; gradients (e.g. expanded ones) can still arrive so.
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def attention_forward(q, k, v, window: int, scale: float):
    q, k, v = _unit_last_stride(q, k, v)
    b, hq, s_len, d = q.shape
    hkv = k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty((b, hq, s_len), dtype=lse_dtype, device=q.device)
    if q.numel() == 0:
        return out, lse
    _check_grid(b * hq)
    cfg = _config("fwd", q.dtype, d)
    grid = (triton.cdiv(s_len, cfg["BLOCK_M"]), b * hq)
    _attn_fwd[grid](
        q, k, v, out, lse, *_s(q), *_s(k), *_s(v), *_s(out),
        hq, hq // hkv, s_len, _window_arg(window, s_len), scale * LOG2E,
        HEAD_DIM=d, **cfg, **_flags(q.dtype),
    )
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, window: int, scale: float):
    b, hq, s_len, d = q.shape
    hkv = k.shape[1]
    grad_out, q, k, v, out = _unit_last_stride(grad_out, q, k, v, out)
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    flags = _flags(q.dtype)
    w = _window_arg(window, s_len)

    delta = torch.empty_like(lse)
    _bwd_delta[(triton.cdiv(s_len, 64), b * hq)](
        out, grad_out, delta, *_s(out), *_s(grad_out), hq, s_len,
        HEAD_DIM=d, BLOCK_M=64, ACC=flags["ACC"], IDX=flags["IDX"],
    )

    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    cfg = _config("dkdv", q.dtype, d)
    _attn_bwd_dkdv[(triton.cdiv(s_len, cfg["BLOCK_N"]), b * hkv)](
        q, k, v, grad_out, lse, delta, dk, dv,
        *_s(q), *_s(k), *_s(v), *_s(grad_out), *_s(dk), *_s(dv),
        hq, hkv, hq // hkv, s_len, w, scale * LOG2E, scale,
        HEAD_DIM=d, **cfg, **flags,
    )

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cfg = _config("dq", q.dtype, d)
    _attn_bwd_dq[(triton.cdiv(s_len, cfg["BLOCK_M"]), b * hq)](
        q, k, v, grad_out, lse, delta, dq,
        *_s(q), *_s(k), *_s(v), *_s(grad_out), *_s(dq),
        hq, hq // hkv, s_len, w, scale * LOG2E, scale,
        HEAD_DIM=d, **cfg, **flags,
    )
    return dq, dk, dv


def flops(batch: int, q_heads: int, seq_len: int, head_dim: int, window: int | None = None) -> dict:
    """Matmul FLOPs of one call, counting only visible (query, key) pairs (see README)."""
    s, w = seq_len, window if window and window < seq_len else seq_len
    pairs = w * (w + 1) // 2 + (s - w) * w  # sum over rows of min(i + 1, w)
    fwd = 4 * batch * q_heads * pairs * head_dim  # QK^T and PV, 2 FLOPs per multiply-add
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}

