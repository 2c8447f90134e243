"""The backward kernels of ``triton_attention`` (FlashAttention-2 style, from the saved logsumexp):
``_bwd_delta`` (rowsum(dO * O)), ``_attn_bwd_dkdv`` (one K/V block against every query block that sees
it) and ``_attn_bwd_dq`` (one query block against its keys), each with the three-range loop split
described in ``triton_attention``, and ``_query_tile_ranges``, that split for a query tile (shared with
the forward). Launched by ``triton_attention.attention_backward`` / ``attention_block_backward``.

Queries and keys may have different lengths and start at different absolute positions (a block of
ring attention): ``offset`` = q_start - k_start, so query row i sits at key coordinate i + offset.
The inner loops are unchanged by this: they receive the other side's indices shifted by the offset.
This module must be imported only after TRITON_INTERPRET is decided (kernels are bound at import).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._compat import patch_interpreter

patch_interpreter()  # Triton < 3.7 interpreter under NumPy >= 2.4; see _compat


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
def _segments(seg_base, offs, seq_len, other):
    return tl.load(seg_base + offs, mask=offs < seq_len, other=other)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                offs_n, offs_d, lo, hi, seq_len, window, qk_scale, seg_k, seg_base,
                MASK: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                IDX: tl.constexpr, HAS_SEG: tl.constexpr):
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
        if HAS_SEG:  # documents end inside any range, masked or not
            pt = tl.where(seg_k[:, None] == _segments(seg_base, offs_m, seq_len, -2)[None, :], pt, 0.0)
        # out_dtype=<acc>.dtype: Triton < 3.8 defaults it to fp32 even for an fp64 acc (see _compat).
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC, out_dtype=dv.dtype)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)  # (BN, BM)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PREC, out_dtype=dk.dtype)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, Q_SEG, K_SEG,
                   stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                   stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                   stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                   num_q_heads, num_kv_heads, group, seq_q, seq_k, offset, window, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                   HAS_SEG: tl.constexpr):
    # One program owns one key block of one KV head and sums over all query heads of its group,
    # so dk/dv need no atomics and GQA needs no repeated K/V.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    hk = (pid_bh % num_kv_heads).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N).to(IDX)
    offs_d = tl.arange(0, HEAD_DIM).to(IDX)
    col_ok = offs_n[:, None] < seq_k
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=col_ok, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=col_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    seg_base = Q_SEG + b * seq_q  # segments [B, Sq] and [B, Sk], contiguous; unused without HAS_SEG
    seg_k = _segments(K_SEG + b * seq_k, offs_n, seq_k, -1) if HAS_SEG else offs_n

    # Query blocks: [lo, diag_hi) straddle the diagonal, [diag_hi, mid) see the whole key block,
    # [mid, hi) touch the window's upper edge (or the end of the queries). Keys sit at query row
    # c0.. (c0 = start_n - offset); rows below c0, or at c0 + BLOCK_N + window - 1 and above, see none.
    c0 = start_n - offset
    hi = tl.minimum(seq_q, c0 + BLOCK_N + window - 1)
    first = tl.minimum(tl.maximum(c0, 0), seq_q)
    lo = (first // BLOCK_M) * BLOCK_M
    hi = tl.where(first < hi, hi, lo)  # no query sees this key block: nothing to visit
    diag_hi = tl.minimum(tl.cdiv(tl.maximum(c0 + BLOCK_N - 1, 0), BLOCK_M) * BLOCK_M, hi)
    mid = tl.minimum((tl.maximum(c0 + window, 0) // BLOCK_M) * BLOCK_M, (seq_q // BLOCK_M) * BLOCK_M)
    mid = tl.maximum(mid, diag_hi)
    cols = offs_n - offset  # key positions as query rows, for the causal/window mask
    for g in range(group):
        h = hk * group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * num_q_heads + h) * seq_q
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
                             stride_qs, stride_dos, cols, offs_d, lo, diag_hi,
                             seq_q, window, qk_scale, seg_k, seg_base, True, BLOCK_M, UPCAST, PREC, IDX, HAS_SEG)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
                             stride_qs, stride_dos, cols, offs_d, diag_hi, mid,
                             seq_q, window, qk_scale, seg_k, seg_base, False, BLOCK_M, UPCAST, PREC, IDX, HAS_SEG)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
                             stride_qs, stride_dos, cols, offs_d, mid, hi,
                             seq_q, window, qk_scale, seg_k, seg_base, True, BLOCK_M, UPCAST, PREC, IDX, HAS_SEG)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _query_tile_ranges(start_m, offset, seq_k, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key loop bounds (lo, mid, diag, hi) of the query tile starting at row start_m (key coordinate
    r0 = start_m + offset): [lo, mid) touch the window's lower edge, [mid, diag) are fully visible to
    every row of the tile and in bounds (no masks), [diag, hi) straddle the diagonal or the end of
    the keys. lo, mid and diag are multiples of BLOCK_N; lo <= mid <= diag <= hi."""
    r0 = start_m + offset
    first = tl.minimum(tl.maximum(r0 - window + 1, 0), seq_k)  # the first key any row can see
    hi = tl.minimum(tl.maximum(r0 + BLOCK_M, 0), seq_k)  # past the last one
    lo = (first // BLOCK_N) * BLOCK_N
    hi = tl.where(first < hi, hi, lo)  # no row sees a key: nothing to visit
    diag = tl.maximum((tl.minimum(tl.maximum(r0 + 1, 0), seq_k) // BLOCK_N) * BLOCK_N, lo)
    full_lo = tl.cdiv(tl.maximum(r0 + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
    mid = tl.minimum(tl.maximum(full_lo, lo), diag)
    return lo, mid, diag, hi


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, lo, hi,
              seq_len, window, qk_scale, seg_q, seg_base,
              MASK: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
              IDX: tl.constexpr, HAS_SEG: tl.constexpr):
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
        if HAS_SEG:
            p = tl.where(seg_q[:, None] == _segments(seg_base, offs_n, seq_len, -1)[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        # out_dtype: as in _dkdv_inner (Triton < 3.8).
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PREC, out_dtype=dq.dtype)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, Q_SEG, K_SEG,
                 stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                 stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                 stride_dqb, stride_dqh, stride_dqs,
                 num_q_heads, group, seq_q, seq_k, offset, window, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                 HAS_SEG: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_q_heads).to(tl.int64)
    h = (pid_bh % num_q_heads).to(tl.int64)
    hk = h // group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M).to(IDX)
    offs_d = tl.arange(0, HEAD_DIM).to(IDX)
    row_ok = offs_m < seq_q
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = pid_bh.to(tl.int64) * seq_q
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    seg_base = K_SEG + b * seq_k  # segments [B, Sq] and [B, Sk], contiguous; unused without HAS_SEG
    seg_q = _segments(Q_SEG + b * seq_q, offs_m, seq_q, -2) if HAS_SEG else offs_m

    lo, mid, diag, hi = _query_tile_ranges(start_m, offset, seq_k, window, BLOCK_M, BLOCK_N)
    rows = offs_m + offset  # query positions as key columns, for the causal/window mask
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_d,
                   lo, mid, seq_k, window, qk_scale, seg_q, seg_base, True, BLOCK_N, UPCAST, PREC, IDX, HAS_SEG)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_d,
                   mid, diag, seq_k, window, qk_scale, seg_q, seg_base, False, BLOCK_N, UPCAST, PREC, IDX, HAS_SEG)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_d,
                   diag, hi, seq_k, window, qk_scale, seg_q, seg_base, True, BLOCK_N, UPCAST, PREC, IDX, HAS_SEG)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
