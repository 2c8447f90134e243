"""FlashAttention-2 style causal attention in Triton: forward, and backward from the saved logsumexp.

Layouts: q [B, Hq, S, D]; k, v [B, Hkv, S, D], any strides with a unit last-dim stride. Query head h
reads KV head h // (Hq // Hkv), addressed directly, so K/V are never repeated in memory. An optional
window w restricts query i to keys i - w < j <= i.

The same kernels compute one block of blockwise (ring) attention (`attention_block_forward/_backward`):
queries at absolute positions q_start.. (Sq of them) against keys at k_start.. (Sk), the mask taken
from the absolute positions. Plain causal attention is the block with q_start = k_start = 0, Sq = Sk.

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
from .reference import compute_dtype
from .triton_attention_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _bwd_delta, _query_tile_ranges

patch_interpreter()  # Triton < 3.7 interpreter under NumPy >= 2.4; see _compat

LOG2E = 1.4426950408889634

# Tile sizes per (kernel, "wide" = 16-bit inputs). 16-bit tiles are multiples of the tensor-core
# MMA shapes and follow the Triton FlashAttention tutorial's A100/H100 choices; fp32/fp64 tiles are
# halved because their operands take twice the shared memory. Tests may replace entries (smaller
# tiles exercise more blocks per sequence under the interpreter).
# Constraints: fwd/dq BLOCK_M % BLOCK_N == 0; dkdv BLOCK_N % BLOCK_M == 0 (then the diagonal of
# plain causal attention starts on a tile boundary and only one tile per row block straddles it).
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
def _attn_fwd(Q, K, V, O, LSE, Q_SEG, K_SEG,
              stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
              stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
              num_q_heads, group, seq_q, seq_k, offset, window, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
              HAS_SEG: tl.constexpr):
    # offset = q_start - k_start: query row i sits at key coordinate i + offset.
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
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=offs_m[:, None] < seq_q,
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    seg_base = K_SEG + b * seq_k  # segments [B, Sq] and [B, Sk], contiguous; unused without HAS_SEG
    seg_q = tl.load(Q_SEG + b * seq_q + offs_m, mask=offs_m < seq_q, other=-2) if HAS_SEG else offs_m

    # Key blocks: [lo, mid) touch the window's lower edge, [mid, diag) are fully visible to every
    # row of this block, [diag, hi) straddle the diagonal.
    lo, mid, diag, hi = _query_tile_ranges(start_m, offset, seq_k, window, BLOCK_M, BLOCK_N)
    rows = offs_m + offset  # query positions as key columns, for the causal/window mask
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, rows, offs_d,
                               lo, mid, seq_k, window, qk_scale, seg_q, seg_base,
                               True, BLOCK_N, UPCAST, PREC, IDX, HAS_SEG)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, rows, offs_d,
                               mid, diag, seq_k, window, qk_scale, seg_q, seg_base,
                               False, BLOCK_N, UPCAST, PREC, IDX, HAS_SEG)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, rows, offs_d,
                               diag, hi, seq_k, window, qk_scale, seg_q, seg_base,
                               True, BLOCK_N, UPCAST, PREC, IDX, HAS_SEG)

    # l == 0 only on rows that see no key (padding rows, or a block's masked rows): out 0, lse -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) / 1.4426950408889634
    row_ok = offs_m < seq_q
    tl.store(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)
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


def _window_arg(window: int, seq_q: int, offset: int = 0) -> int:
    """The window the kernels mask with: w, or, without one (or with one wider than every query-key
    distance), the smallest value that keeps every causal key, so the tile ranges start at key 0."""
    reach = max(seq_q + offset, 1)  # > q_pos - k_pos of every real query/key pair
    return window if 0 < window < reach else reach


def _check_grid(batch_heads: int) -> None:
    if batch_heads > 65535:  # CUDA's limit on the second grid axis
        raise ValueError(f"causal_attention (Triton): batch * heads = {batch_heads} exceeds 65535; "
                         "split the batch")


def _s(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last_stride(*tensors):
    # The public wrapper rejects these layouts; gradients (e.g. expanded ones) can still arrive so.
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _segments_args(q_segments, k_segments, q):
    """(q pointer tensor, k pointer tensor, HAS_SEG): int32 [B, Sq] / [B, Sk] contiguous document ids,
    or dummies when there are none."""
    if q_segments is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        return dummy, dummy, False
    return q_segments.to(torch.int32).contiguous(), k_segments.to(torch.int32).contiguous(), True


def _forward(q, k, v, offset: int, window: int, scale: float, q_segments, k_segments):
    q, k, v = _unit_last_stride(q, k, v)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=compute_dtype(q.dtype), device=q.device)
    if q.numel() == 0:
        return out, lse
    if sk == 0:  # no keys at all: every row sees none
        return out.zero_(), lse.fill_(float("-inf"))
    _check_grid(b * hq)
    q_seg, k_seg, has_seg = _segments_args(q_segments, k_segments, q)
    cfg = _config("fwd", q.dtype, d)
    grid = (triton.cdiv(sq, cfg["BLOCK_M"]), b * hq)
    _attn_fwd[grid](
        q, k, v, out, lse, q_seg, k_seg, *_s(q), *_s(k), *_s(v), *_s(out),
        hq, hq // hkv, sq, sk, offset, _window_arg(window, sq, offset), scale * LOG2E,
        HEAD_DIM=d, **cfg, **_flags(q.dtype), HAS_SEG=has_seg,
    )
    return out, lse


def _backward(grad_out, q, k, v, lse, delta, offset: int, window: int, scale: float, q_segments, k_segments):
    """dq, dk, dv from the logsumexp and delta = rowsum(dO * O), both (B, Hq, Sq) contiguous."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    _check_grid(b * hq)
    q_seg, k_seg, has_seg = _segments_args(q_segments, k_segments, q)
    flags = _flags(q.dtype)
    w = _window_arg(window, sq, offset)

    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    cfg = _config("dkdv", q.dtype, d)
    _attn_bwd_dkdv[(triton.cdiv(sk, cfg["BLOCK_N"]), b * hkv)](
        q, k, v, grad_out, lse, delta, dk, dv, q_seg, k_seg,
        *_s(q), *_s(k), *_s(v), *_s(grad_out), *_s(dk), *_s(dv),
        hq, hkv, hq // hkv, sq, sk, offset, w, scale * LOG2E, scale,
        HEAD_DIM=d, **cfg, **flags, HAS_SEG=has_seg,
    )

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cfg = _config("dq", q.dtype, d)
    _attn_bwd_dq[(triton.cdiv(sq, cfg["BLOCK_M"]), b * hq)](
        q, k, v, grad_out, lse, delta, dq, q_seg, k_seg,
        *_s(q), *_s(k), *_s(v), *_s(grad_out), *_s(dq),
        hq, hq // hkv, sq, sk, offset, w, scale * LOG2E, scale,
        HEAD_DIM=d, **cfg, **flags, HAS_SEG=has_seg,
    )
    return dq, dk, dv


def attention_forward(q, k, v, window: int, scale: float, segments=None):
    return _forward(q, k, v, 0, window, scale, segments, segments)


def attention_backward(grad_out, q, k, v, out, lse, window: int, scale: float, segments=None):
    b, hq, s_len, d = q.shape
    grad_out, q, k, v, out = _unit_last_stride(grad_out, q, k, v, out)
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    flags = _flags(q.dtype)
    delta = torch.empty_like(lse)
    _bwd_delta[(triton.cdiv(s_len, 64), b * hq)](
        out, grad_out, delta, *_s(out), *_s(grad_out), hq, s_len,
        HEAD_DIM=d, BLOCK_M=64, ACC=flags["ACC"], IDX=flags["IDX"],
    )
    return _backward(grad_out, q, k, v, lse, delta, 0, window, scale, segments, segments)


def attention_block_forward(q, k, v, q_start: int, k_start: int, window: int, scale: float,
                            q_segments=None, k_segments=None):
    """One block of blockwise attention (see reference.attention_block_forward): (out like q, lse
    (B, Hq, Sq) fp32, fp64 for fp64 inputs). Rows that see no key get out 0 and lse -inf."""
    return _forward(q, k, v, q_start - k_start, window, scale, q_segments, k_segments)


def attention_block_backward(grad_out, q, k, v, lse, delta, q_start: int, k_start: int, window: int,
                             scale: float, q_segments=None, k_segments=None):
    """One block's (dq, dk, dv) from the merged lse and delta = rowsum(dO * O_merged), (B, Hq, Sq) each."""
    grad_out, q, k, v = _unit_last_stride(grad_out, q, k, v)
    stat = compute_dtype(q.dtype)
    # A row that sees no key in any block has lse -inf; exp(s - 0) on its (all masked) scores keeps
    # inf * 0 out of the kernels, as the reference does.
    lse = lse.to(stat).masked_fill(lse == float("-inf"), 0.0).contiguous()
    delta = delta.to(stat).contiguous()
    return _backward(grad_out, q, k, v, lse, delta, q_start - k_start, window, scale, q_segments, k_segments)


def flops(batch: int, q_heads: int, seq_len: int, head_dim: int, window: int | None = None) -> dict:
    """Matmul FLOPs of one call, counting only visible (query, key) pairs (see README)."""
    s, w = seq_len, window if window and window < seq_len else seq_len
    pairs = w * (w + 1) // 2 + (s - w) * w  # sum over rows of min(i + 1, w)
    fwd = 4 * batch * q_heads * pairs * head_dim  # QK^T and PV, 2 FLOPs per multiply-add
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}

