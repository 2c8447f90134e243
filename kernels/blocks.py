"""Attention blocks for context parallelism: ring attention computes causal attention block by block
(queries at absolute positions q_start.., keys at k_start..) and merges the blocks' outputs by their
log-sum-exp. No autograd here: the caller's autograd.Function runs every block's forward and backward.

Custom ops dispatching per call between the Triton kernels (``triton_attention``) and the PyTorch
reference (``reference.attention_block_*``), like the ops in ``ops.py``, whose checks they share.
"""

from __future__ import annotations

if __name__.partition(".")[0] != "pretrain_kernels":  # see __init__.py: the ops must be defined once
    raise ImportError(f"{__name__}: import this module as pretrain_kernels.{__name__.rpartition('.')[2]}")

from typing import Optional

import torch
from torch import Tensor

from . import _backend, reference
from .ops import _check_attention, _check_segments, _on, _stat_dtype



@torch.library.custom_op("pretrain_kernels::attention_block_fwd", mutates_args=())
def _attention_block_fwd(q: Tensor, k: Tensor, v: Tensor, q_start: int, k_start: int, window: int,
                         scale: float, q_segments: Optional[Tensor] = None,
                         k_segments: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    if _backend.use_triton(q):
        from . import triton_attention

        with _on(q):
            return triton_attention.attention_block_forward(q, k, v, q_start, k_start, window, scale,
                                                            q_segments, k_segments)
    out, lse = reference.attention_block_forward(q, k, v, q_start, k_start, window, scale, q_segments, k_segments)
    return out.contiguous(), lse.contiguous()


@_attention_block_fwd.register_fake
def _(q, k, v, q_start, k_start, window, scale, q_segments=None, k_segments=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_stat_dtype(q.dtype))


@torch.library.custom_op("pretrain_kernels::attention_block_bwd", mutates_args=())
def _attention_block_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor,
                         q_start: int, k_start: int, window: int, scale: float,
                         q_segments: Optional[Tensor] = None,
                         k_segments: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    if _backend.use_triton(q):
        from . import triton_attention

        with _on(q):
            return triton_attention.attention_block_backward(grad_out, q, k, v, lse, delta, q_start, k_start,
                                                             window, scale, q_segments, k_segments)
    dq, dk, dv = reference.attention_block_backward(grad_out, q, k, v, lse, delta, q_start, k_start, window,
                                                    scale, q_segments, k_segments)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_block_bwd.register_fake
def _(grad_out, q, k, v, lse, delta, q_start, k_start, window, scale, q_segments=None, k_segments=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _check_block(where: str, q: Tensor, k: Tensor, v: Tensor, q_start, k_start, window, scale,
                 q_segments, k_segments) -> None:
    _check_attention(q, k, v, window, scale, where, same_length=False)
    for name, start, length in (("q_start", q_start, q.shape[2]), ("k_start", k_start, k.shape[2])):
        if isinstance(start, bool) or not isinstance(start, int) or start < 0 or start + length >= 2 ** 31:
            raise ValueError(f"{where}: {name} must be an int position with 0 <= {name} and "
                             f"{name} + length < 2**31, got {start!r}")
    if (q_segments is None) != (k_segments is None):
        raise ValueError(f"{where}: give both q_segments and k_segments, or neither")
    _check_segments(where, "q_segments", q_segments, q, q.shape[2])
    _check_segments(where, "k_segments", k_segments, q, k.shape[2])


def _block_args(q, scale, q_segments, k_segments):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q_segments is not None:
        q_segments, k_segments = q_segments.to(torch.int32).contiguous(), k_segments.to(torch.int32).contiguous()
    return scale, q_segments, k_segments


def attention_block_forward(q: Tensor, k: Tensor, v: Tensor, *, q_start: int, k_start: int,
                            window: int | None = None, scale: float | None = None,
                            q_segments: Tensor | None = None,
                            k_segments: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One block of blockwise (ring) attention: queries at absolute positions q_start..q_start+Sq-1
    against keys at k_start..k_start+Sk-1.

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D), Hq % Hkv == 0. Query at position i sees key at j iff
    j <= i, i - j < window (if given), and q_segments[b, row] == k_segments[b, col] (if given:
    (B, Sq) and (B, Sk) integer document ids). scale defaults to D ** -0.5.
    Returns (out (B, Hq, Sq, D) of q's dtype, lse (B, Hq, Sq) float32, float64 for float64 inputs):
    the block's own softmax output and natural-log logsumexp; rows that see no key get out 0 and
    lse -inf. Merge blocks with lse = logaddexp(lse_a, lse_b), out = sum(out_x * exp(lse_x - lse)).
    Not differentiable: pair it with attention_block_backward in the caller's autograd.Function.
    """
    where = "attention_block_forward"
    _check_block(where, q, k, v, q_start, k_start, window, scale, q_segments, k_segments)
    scale, q_segments, k_segments = _block_args(q, scale, q_segments, k_segments)
    return _attention_block_fwd(q, k, v, q_start, k_start, window or 0, scale, q_segments, k_segments)


def attention_block_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, *,
                             q_start: int, k_start: int, window: int | None = None, scale: float | None = None,
                             q_segments: Tensor | None = None,
                             k_segments: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One block's gradients (dq, dk, dv), shaped and typed like q, k, v.

    grad_out: (B, Hq, Sq, D), the gradient of the *merged* output O of all blocks of these queries;
    lse: (B, Hq, Sq), the merged logsumexp; delta: (B, Hq, Sq) = (grad_out * O).sum(-1) (computed by
    the caller once, from the merged O). Summing dq over a query block's key blocks, and dk, dv over a
    key block's query blocks, gives the gradients of the full attention. Other arguments as in
    attention_block_forward.
    """
    where = "attention_block_backward"
    _check_block(where, q, k, v, q_start, k_start, window, scale, q_segments, k_segments)
    if not isinstance(grad_out, Tensor) or grad_out.shape != q.shape or grad_out.dtype != q.dtype \
            or grad_out.device != q.device:
        raise ValueError(f"{where}: grad_out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), got "
                         f"{getattr(grad_out, 'shape', type(grad_out))}")
    for name, t in (("lse", lse), ("delta", delta)):
        if not isinstance(t, Tensor) or t.shape != q.shape[:3] or not t.is_floating_point() \
                or t.device != q.device:
            raise ValueError(f"{where}: {name} must be a floating (B, Hq, Sq) = {tuple(q.shape[:3])} tensor "
                             f"on {q.device}, got {getattr(t, 'shape', type(t))}")
    scale, q_segments, k_segments = _block_args(q, scale, q_segments, k_segments)
    return _attention_block_bwd(grad_out, q, k, v, lse, delta, q_start, k_start, window or 0, scale,
                                q_segments, k_segments)
