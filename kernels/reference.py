"""PyTorch reference implementations: the CPU path, and the ground truth the Triton kernels are tested against.

They compute exactly the functions the Triton kernels compute, with the same saved statistics
(attention: logsumexp per query row; RMSNorm: 1/rms per row), so the two backends are
interchangeable inside one custom op. Low-precision inputs are computed in float32, float64 in float64.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """[S, S] bool, True where query i may attend to key j: i - window < j <= i (window <= 0: no window)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    mask = j <= i
    if window > 0:
        mask = mask & (i - j < window)
    return mask


def _grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    # Query head h reads KV head h // G (the repeat_interleave / Hugging Face repeat_kv convention).
    b, hq, s, d = q.shape
    return q.reshape(b, num_kv_heads, hq // num_kv_heads, s, d)  # (B, Hkv, G, S, D)


def _scores(q, k, window, scale, segments=None):
    ct = compute_dtype(q.dtype)
    qg = _grouped(q.to(ct), k.shape[1])  # (B, Hkv, G, S, D)
    kf = k.to(ct).unsqueeze(2)  # (B, Hkv, 1, S, D): broadcast over the group, never repeated
    s = torch.matmul(qg, kf.transpose(-1, -2)) * scale  # (B, Hkv, G, S, S)
    mask = causal_window_mask(q.shape[2], window, q.device)
    if segments is not None:  # (B, 1, 1, S, S): query and key in the same document
        mask = mask & (segments[:, None, None, :, None] == segments[:, None, None, None, :])
    return s.masked_fill(~mask, float("-inf"))


def attention_forward(q, k, v, window: int, scale: float, segments=None):
    """Returns (out like q, lse [B, Hq, S] in the compute dtype, natural log). segments: [B, S] int or None."""
    b, hq, s_len, d = q.shape
    s = _scores(q, k, window, scale, segments)
    lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, G, S)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.matmul(p, v.to(s.dtype).unsqueeze(2))  # (B, Hkv, G, S, D)
    return out.reshape(b, hq, s_len, d).to(q.dtype), lse.reshape(b, hq, s_len)


def attention_backward(grad_out, q, k, v, out, lse, window: int, scale: float, segments=None):
    """Gradients (dq, dk, dv) from the saved logsumexp, FlashAttention-2's equations in dense form."""
    del out  # delta is taken as rowsum(P * dP), which equals rowsum(dO * O) and avoids O's rounding
    b, hq, s_len, d = q.shape
    hkv = k.shape[1]
    s = _scores(q, k, window, scale, segments)
    ct = s.dtype
    p = torch.exp(s - _grouped(lse.to(ct).unsqueeze(-1), hkv))  # (B, Hkv, G, S, S)
    do = _grouped(grad_out.to(ct), hkv)  # (B, Hkv, G, S, D)
    vf = v.to(ct).unsqueeze(2)
    dv = torch.matmul(p.transpose(-1, -2), do).sum(2)  # (B, Hkv, S, D)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k.to(ct).unsqueeze(2)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), _grouped(q.to(ct), hkv)).sum(2) * scale
    return dq.reshape(b, hq, s_len, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def block_mask(q_len: int, k_len: int, q_start: int, k_start: int, window: int, device: torch.device,
               q_segments=None, k_segments=None) -> torch.Tensor:
    """bool, True where query i (absolute position q_start + i) may attend key j (k_start + j):
    k_pos <= q_pos, within the window (window <= 0: none), and in the same document when segments
    ([B, Sq] and [B, Sk]) are given. [Sq, Sk], or [B, 1, 1, Sq, Sk] with segments."""
    i = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    j = torch.arange(k_start, k_start + k_len, device=device)[None, :]
    mask = j <= i
    if window > 0:
        mask = mask & (i - j < window)
    if q_segments is not None:
        mask = mask & (q_segments[:, None, None, :, None] == k_segments[:, None, None, None, :])
    return mask


def _block_scores(q, k, q_start, k_start, window, scale, q_segments, k_segments):
    ct = compute_dtype(q.dtype)
    qg = _grouped(q.to(ct), k.shape[1])  # (B, Hkv, G, Sq, D)
    s = torch.matmul(qg, k.to(ct).unsqueeze(2).transpose(-1, -2)) * scale  # (B, Hkv, G, Sq, Sk)
    mask = block_mask(q.shape[2], k.shape[2], q_start, k_start, window, q.device, q_segments, k_segments)
    return s.masked_fill(~mask, float("-inf"))


def attention_block_forward(q, k, v, q_start: int, k_start: int, window: int, scale: float,
                            q_segments=None, k_segments=None):
    """One block of a blockwise (ring) attention: queries q (B, Hq, Sq, D) at absolute positions
    q_start.., keys/values k, v (B, Hkv, Sk, D) at k_start.. (see ``block_mask``).

    Returns (out like q, lse (B, Hq, Sq) in the compute dtype): the block's own softmax output and
    logsumexp. A query row with no visible key gets out 0 and lse -inf, so partial results merge
    with ``lse = logaddexp(lse_a, lse_b)``, ``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``.
    """
    b, hq, sq, d = q.shape
    s = _block_scores(q, k, q_start, k_start, window, scale, q_segments, k_segments)
    lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, G, Sq); -inf on rows with no visible key
    p = torch.exp(s - lse.nan_to_num(neginf=0.0).unsqueeze(-1))  # exp(-inf) = 0 on masked entries
    out = torch.matmul(p, v.to(s.dtype).unsqueeze(2))
    return out.reshape(b, hq, sq, d).to(q.dtype), lse.reshape(b, hq, sq)


def attention_block_backward(grad_out, q, k, v, lse, delta, q_start: int, k_start: int, window: int,
                             scale: float, q_segments=None, k_segments=None):
    """One block's (dq, dk, dv) from the *merged* statistics of all blocks: lse (B, Hq, Sq), the merged
    logsumexp, and delta (B, Hq, Sq) = rowsum(dO * O) of the merged output O (FlashAttention-2)."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    s = _block_scores(q, k, q_start, k_start, window, scale, q_segments, k_segments)
    ct = s.dtype
    lse = _grouped(lse.to(ct).unsqueeze(-1), hkv).nan_to_num(neginf=0.0)
    p = torch.exp(s - lse)  # (B, Hkv, G, Sq, Sk)
    do = _grouped(grad_out.to(ct), hkv)
    dv = torch.matmul(p.transpose(-1, -2), do).sum(2)
    dp = torch.matmul(do, v.to(ct).unsqueeze(2).transpose(-1, -2))
    ds = p * (dp - _grouped(delta.to(ct).unsqueeze(-1), hkv))
    dq = torch.matmul(ds, k.to(ct).unsqueeze(2)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), _grouped(q.to(ct), hkv)).sum(2) * scale
    return dq.reshape(b, hq, sq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def rms_norm_forward(x, weight, eps: float):
    """Returns (y like x, rstd = 1/sqrt(mean(x^2) + eps) per row, in the compute dtype, shape x.shape[:-1])."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    y = xf * rstd.unsqueeze(-1) * weight.to(ct)
    return y.to(x.dtype), rstd


def rms_norm_backward(grad_y, x, weight, rstd):
    ct = compute_dtype(x.dtype)
    xhat = x.to(ct) * rstd.to(ct).unsqueeze(-1)
    gw = grad_y.to(ct) * weight.to(ct)
    dx = rstd.to(ct).unsqueeze(-1) * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
    dw = (grad_y.to(ct) * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_half_transposed(x: torch.Tensor) -> torch.Tensor:
    """The adjoint of rotate_half: cat(x2, -x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, -x1), dim=-1)


def rotary(x, cos, sin, transposed: bool = False):
    """x * cos + rotate_half(x) * sin; with transposed=True the adjoint map (used by the backward)."""
    ct = compute_dtype(x.dtype)
    xf, c, s = x.to(ct), cos.to(ct), sin.to(ct)
    if transposed:
        return (xf * c + rotate_half_transposed(xf * s)).to(x.dtype)
    return (xf * c + rotate_half(xf) * s).to(x.dtype)
