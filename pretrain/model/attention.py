"""Attention, RMSNorm and rotary embedding, dispatched to a backend named in the model config.

- ``sdpa``: PyTorch scaled_dot_product_attention (flash / memory-efficient kernels where available).
- ``eager``: explicit math, the readable reference.
- ``triton``: the fused kernels in ``kernels/`` (imported as ``pretrain_kernels``).

Shapes: q [b, hq, s, d]; k, v [b, hkv, s, d] with hq % hkv == 0 (GQA/MQA).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _kernels():
    import pretrain_kernels

    return pretrain_kernels


def causal_mask(q_len: int, k_len: int, window: Optional[int], device, offset: Optional[int] = None) -> torch.Tensor:
    """bool [q_len, k_len], True where query i (at absolute position offset + i) may attend key j.

    Allowed: j <= offset + i and, with a window, j > offset + i - window; ``window=None`` means no window.
    ``offset`` defaults to k_len - q_len: the queries are the last q_len keys' positions (a KV cache's
    new tokens after ``past`` cached ones; 0 for plain self-attention).
    """
    offset = k_len - q_len if offset is None else offset
    pos = torch.arange(offset, offset + q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    allowed = j <= pos
    return allowed if window is None else allowed & (j > pos - window)


def segment_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """tokens [b, s] -> int32 [b, s]: the index of each token's document in its packed row. An
    end-of-text token belongs to the document it ends; the next token starts a new one."""
    ends = tokens == eod
    return (torch.cumsum(ends, dim=1, dtype=torch.int32) - ends.int()).contiguous()


def allowed_mask(s: int, window: Optional[int], segments: Optional[torch.Tensor], device) -> torch.Tensor:
    """bool, True where query i may attend key j: [s, s], or [b, 1, s, s] within documents when
    ``segments`` [b, s] is given."""
    allowed = causal_mask(s, s, window, device)
    if segments is None:
        return allowed
    return allowed & (segments[:, None, :, None] == segments[:, None, None, :])


def attention(q, k, v, window: Optional[int], dropout_p: float, backend: str,
              segments: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``segments`` [b, s] (``segment_ids``): attend only within a document, besides causal and window."""
    if backend == "triton" and dropout_p == 0.0:
        return _kernels().causal_attention(q.contiguous(), k.contiguous(), v.contiguous(), window=window,
                                           segments=segments)
    if backend == "eager":
        return _eager_attention(q, k, v, window, dropout_p, segments)
    s = q.shape[2]
    mask = None if window is None and segments is None else allowed_mask(s, window, segments, q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None, enable_gqa=k.shape[1] != q.shape[1]
    )


def _eager_attention(q, k, v, window, dropout_p, segments=None):
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5  # (b, h, s, s)
    allowed = allowed_mask(q.shape[2], window, segments, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = F.dropout(probs, dropout_p, training=dropout_p > 0.0)
    return probs @ v


def rms_norm(x, weight, eps: float, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernels().rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(q, k, cos, sin, backend: str):
    """Rotate q and k by position; cos/sin [s, d] in the rotate-half convention."""
    if backend == "triton":
        return _kernels().apply_rotary(q.contiguous(), k.contiguous(), cos.contiguous(), sin.contiguous())
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
