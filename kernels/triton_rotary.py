"""Fused rotary position embedding in Triton, for q and k in one launch.

Rotate-half (GPT-NeoX / Hugging Face Llama) convention with x = [x1, x2] split at D/2 and
cos = [c1, c2], sin = [s1, s2] of shape [S, D]:
    out1 = x1*c1 - x2*s1,  out2 = x2*c2 + x1*s2          (x*cos + rotate_half(x)*sin)
The adjoint, used by the backward, is out1 = x1*c1 + x2*s2, out2 = x2*c2 - x1*s1.
Grid: (sequence blocks, batch, Hq + Hkv); heads below Hq are q's, the rest k's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._compat import patch_interpreter

patch_interpreter()  # Triton < 3.7 interpreter under NumPy >= 2.4; see _compat


@triton.jit
def _rotary(Q, K, COS, SIN, QO, KO,
            stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
            stride_qob, stride_qoh, stride_qos, stride_kob, stride_koh, stride_kos,
            stride_cs, stride_ss, num_q_heads, seq_len,
            HALF: tl.constexpr, BLOCK_S: tl.constexpr, TRANSPOSED: tl.constexpr, ACC: tl.constexpr):
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    if h < num_q_heads:
        src = Q + b * stride_qb + h * stride_qh
        dst = QO + b * stride_qob + h * stride_qoh
        stride_src = stride_qs
        stride_dst = stride_qos
    else:
        src = K + b * stride_kb + (h - num_q_heads) * stride_kh
        dst = KO + b * stride_kob + (h - num_q_heads) * stride_koh
        stride_src = stride_ks
        stride_dst = stride_kos
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HALF)
    mask = offs_s[:, None] < seq_len
    x_ptrs = src + offs_s[:, None] * stride_src + offs_d[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(ACC)
    c_ptrs = COS + offs_s[:, None] * stride_cs + offs_d[None, :]
    s_ptrs = SIN + offs_s[:, None] * stride_ss + offs_d[None, :]
    c1 = tl.load(c_ptrs, mask=mask, other=0.0).to(ACC)
    c2 = tl.load(c_ptrs + HALF, mask=mask, other=0.0).to(ACC)
    s1 = tl.load(s_ptrs, mask=mask, other=0.0).to(ACC)
    s2 = tl.load(s_ptrs + HALF, mask=mask, other=0.0).to(ACC)
    if TRANSPOSED:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    o_ptrs = dst + offs_s[:, None] * stride_dst + offs_d[None, :]
    tl.store(o_ptrs, o1.to(QO.dtype.element_ty), mask=mask)
    tl.store(o_ptrs + HALF, o2.to(QO.dtype.element_ty), mask=mask)


def _s(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def rotary(q, k, cos, sin, transposed: bool = False):
    # The public wrapper rejects these layouts; gradients (e.g. expanded ones) can still arrive so.
    q, k, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
    b, hq, s_len, d = q.shape
    hkv = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out
    if max(b, hq + hkv) > 65535:  # CUDA's limit on the second and third grid axes
        raise ValueError(f"apply_rotary (Triton): batch {b} or heads {hq + hkv} exceed 65535")
    block_s = min(triton.next_power_of_2(s_len), max(16, 4096 // d))
    _rotary[(triton.cdiv(s_len, block_s), b, hq + hkv)](
        q, k, cos, sin, q_out, k_out, *_s(q), *_s(k), *_s(q_out), *_s(k_out),
        cos.stride(0), sin.stride(0), hq, s_len,
        HALF=d // 2, BLOCK_S=block_s, TRANSPOSED=transposed,
        ACC=tl.float64 if q.dtype == torch.float64 else tl.float32, num_warps=4,
    )
    return q_out, k_out
