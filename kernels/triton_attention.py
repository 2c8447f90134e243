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
from ._compat import patch_interpreter
from .triton_attention_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _bwd_delta

patch_interpreter()  # Triton < 3.7 interpreter under NumPy >= 2.4; see _compat

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
               seq_len, window, qk_scale, seg_q, seg_base,
               MASK: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
               IDX: tl.constexpr, HAS_SEG: tl.constexpr):
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
            if HAS_SEG:
                visible = visible & (seg_q[:, None] == _key_segments(seg_base, offs_n, seq_len)[None, :])
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row with nothing visible yet keeps m = -inf; shift by 0 instead to avoid inf - inf.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        elif HAS_SEG:  # the causal window sees the whole tile, but documents still end inside it
            visible = seg_q[:, None] == _key_segments(seg_base, offs_n, seq_len)[None, :]
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
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
        # out_dtype=acc.dtype: Triton < 3.8 defaults it to fp32 even for an fp64 acc (see _compat).
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC, out_dtype=acc.dtype)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_segments(seg_base, offs_n, seq_len):
    return tl.load(seg_base + offs_n, mask=offs_n < seq_len, other=-1)  # -1: past the end, no document


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, SEG,
              stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
              stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
              num_q_heads, group, seq_len, window, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
              HAS_SEG: tl.constexpr):
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
    seg_base = SEG + b * seq_len  # segments [B, S], contiguous; unused without HAS_SEG
    seg_q = tl.load(seg_base + offs_m, mask=offs_m < seq_len, other=-2) if HAS_SEG else offs_m

    # Key blocks: [lo, mid) touch the window's lower edge, [mid, start_m) are fully visible to every
    # row of this block, [start_m, hi) straddle the diagonal.
    lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
    mid = tl.minimum(tl.maximum(full_lo, lo), start_m)
    hi = tl.minimum(start_m + BLOCK_M, seq_len)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                               lo, mid, seq_len, window, qk_scale, seg_q, seg_base,
                               True, BLOCK_N, UPCAST, PREC, IDX, HAS_SEG)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                               mid, start_m, seq_len, window, qk_scale, seg_q, seg_base,
                               False, BLOCK_N, UPCAST, PREC, IDX, HAS_SEG)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                               start_m, hi, seq_len, window, qk_scale, seg_q, seg_base,
                               True, BLOCK_N, UPCAST, PREC, IDX, HAS_SEG)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows past seq_len can have l == 0
    out = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) / 1.4426950408889634
    row_ok = offs_m < seq_len
    tl.store(LSE + pid_bh.to(tl.int64) * seq_len + offs_m, lse, mask=row_ok)
    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])


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


def _segments_arg(segments, q):
    """(pointer tensor, HAS_SEG): int32 [B, S] contiguous document ids, or a dummy when there are none."""
    if segments is None:
        return torch.zeros(1, dtype=torch.int32, device=q.device), False
    return segments.to(torch.int32).contiguous(), True


def attention_forward(q, k, v, window: int, scale: float, segments=None):
    q, k, v = _unit_last_stride(q, k, v)
    seg, has_seg = _segments_arg(segments, q)
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
        q, k, v, out, lse, seg, *_s(q), *_s(k), *_s(v), *_s(out),
        hq, hq // hkv, s_len, _window_arg(window, s_len), scale * LOG2E,
        HEAD_DIM=d, **cfg, **_flags(q.dtype), HAS_SEG=has_seg,
    )
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, window: int, scale: float, segments=None):
    b, hq, s_len, d = q.shape
    seg, has_seg = _segments_arg(segments, q)
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
        q, k, v, grad_out, lse, delta, dk, dv, seg,
        *_s(q), *_s(k), *_s(v), *_s(grad_out), *_s(dk), *_s(dv),
        hq, hkv, hq // hkv, s_len, w, scale * LOG2E, scale,
        HEAD_DIM=d, **cfg, **flags, HAS_SEG=has_seg,
    )

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cfg = _config("dq", q.dtype, d)
    _attn_bwd_dq[(triton.cdiv(s_len, cfg["BLOCK_M"]), b * hq)](
        q, k, v, grad_out, lse, delta, dq, seg,
        *_s(q), *_s(k), *_s(v), *_s(grad_out), *_s(dq),
        hq, hq // hkv, s_len, w, scale * LOG2E, scale,
        HEAD_DIM=d, **cfg, **flags, HAS_SEG=has_seg,
    )
    return dq, dk, dv


def flops(batch: int, q_heads: int, seq_len: int, head_dim: int, window: int | None = None) -> dict:
    """Matmul FLOPs of one call, counting only visible (query, key) pairs (see README)."""
    s, w = seq_len, window if window and window < seq_len else seq_len
    pairs = w * (w + 1) // 2 + (s - w) * w  # sum over rows of min(i + 1, w)
    fwd = 4 * batch * q_heads * pairs * head_dim  # QK^T and PV, 2 FLOPs per multiply-add
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}

