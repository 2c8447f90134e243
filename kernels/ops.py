"""The public kernel API as torch.library custom ops.

Each op picks its implementation per call (see _backend.use_triton): Triton on CUDA or under the
interpreter when forced, the PyTorch reference otherwise. Both return the same outputs with the same
layouts (contiguous), so fake tensors, opcheck and torch.compile see one op. The Triton modules are
imported lazily: they bind their kernels to the interpreter or the GPU compiler at import time.
"""

from __future__ import annotations

if __name__.partition(".")[0] != "pretrain_kernels":  # see __init__.py: the ops must be defined once
    raise ImportError(f"{__name__}: import this module as pretrain_kernels.{__name__.rpartition('.')[2]}")

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import _backend, reference

HEAD_DIMS = (16, 32, 64, 128)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_NORM_DIM = 65536


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _on(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# attention


@torch.library.custom_op("pretrain_kernels::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float,
                   segments: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    if _backend.use_triton(q):
        from . import triton_attention

        with _on(q):
            return triton_attention.attention_forward(q, k, v, window, scale, segments)
    out, lse = reference.attention_forward(q, k, v, window, scale, segments)
    return out.contiguous(), lse.contiguous()


@_attention_fwd.register_fake
def _(q, k, v, window, scale, segments=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_stat_dtype(q.dtype))


@torch.library.custom_op("pretrain_kernels::attention_bwd", mutates_args=())
def _attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   window: int, scale: float, segments: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    if _backend.use_triton(q):
        from . import triton_attention

        with _on(q):
            return triton_attention.attention_backward(grad_out, q, k, v, out, lse, window, scale, segments)
    dq, dk, dv = reference.attention_backward(grad_out, q, k, v, out, lse, window, scale, segments)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, window, scale, segments=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, window, scale, segments = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # an internal statistic for the backward
    ctx.save_for_backward(q, k, v, out, lse, segments)
    ctx.window, ctx.scale = window, scale


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, segments = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _attention_bwd(grad_out, q, k, v, out, lse, ctx.window, ctx.scale, segments)
    return dq, dk, dv, None, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


def _check_segments(where: str, name: str, segments, q: Tensor, length: int) -> None:
    if segments is None:
        return
    if not isinstance(segments, Tensor) or segments.shape != (q.shape[0], length):
        raise ValueError(f"{where}: {name} must be a [B, S] = [{q.shape[0]}, {length}] tensor, got "
                         f"{getattr(segments, 'shape', type(segments))}")
    if segments.dtype not in (torch.int32, torch.int64) or segments.device != q.device:
        raise ValueError(f"{where}: {name} must be int32/int64 on {q.device}, got {segments.dtype} "
                         f"on {segments.device}")


def _check_attention(q: Tensor, k: Tensor, v: Tensor, window, scale, where: str = "causal_attention",
                     same_length: bool = True) -> None:
    """Shapes, dtypes, layouts and options; same_length=False allows Sq != Sk (attention blocks)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{where}: {name} must be a 4-D tensor [B, H, S, D], got "
                             f"{getattr(t, 'shape', type(t))}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{where}: {name} has unsupported dtype {t.dtype}; "
                             f"expected one of {FLOAT_DTYPES}")
        if t.stride(-1) != 1:
            raise ValueError(f"{where}: {name} must have a contiguous last (head) dimension, "
                             f"got strides {tuple(t.stride())}; call .contiguous() first")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{where}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{where}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{where}: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    b, hq, s, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or (same_length and k.shape[2] != s):
        agree = "batch, sequence length and head dim" if same_length else "batch and head dim"
        raise ValueError(f"{where}: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on "
                         f"{agree} ([B, H, S, D] layout)")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{where}: query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if d not in HEAD_DIMS:
        raise ValueError(f"{where}: unsupported head dim {d}; supported: {HEAD_DIMS}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"{where}: window must be None or a positive int, got {window!r}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"{where}: scale must be None or a float, got {scale!r}")


def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                     scale: float | None = None, segments: Tensor | None = None) -> Tensor:
    """Causal softmax attention, FlashAttention-2 style on the Triton path.

    q: (B, Hq, S, D); k, v: (B, Hkv, S, D) with Hq % Hkv == 0 (query head h uses KV head h // (Hq/Hkv)).
    window=w: query i sees keys j with i - w < j <= i. scale defaults to D ** -0.5.
    segments: (B, S) integer document ids (packed sequences): query i sees key j only if
    segments[b, i] == segments[b, j].
    Returns a contiguous (B, Hq, S, D) tensor of q's dtype.
    """
    _check_attention(q, k, v, window, scale)
    _check_segments("causal_attention", "segments", segments, q, q.shape[2])
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if segments is not None:
        segments = segments.to(torch.int32).contiguous()
    out, _ = _attention_fwd(q, k, v, window or 0, float(scale), segments)
    return out


# --------------------------------------------------------------------------------------------------
# RMSNorm


@torch.library.custom_op("pretrain_kernels::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if _backend.use_triton(x):
        from . import triton_norm

        with _on(x):
            return triton_norm.rms_norm_forward(x, weight, eps)
    y, rstd = reference.rms_norm_forward(x, weight, eps)
    return y.contiguous(), rstd.contiguous()


@_rms_norm_fwd.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=_stat_dtype(x.dtype))


@torch.library.custom_op("pretrain_kernels::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    if _backend.use_triton(x):
        from . import triton_norm

        with _on(x):
            return triton_norm.rms_norm_backward(grad_y, x, weight, rstd)
    dx, dw = reference.rms_norm_backward(grad_y, x, weight, rstd)
    return dx.contiguous(), dw.contiguous()


@_rms_norm_bwd.register_fake
def _(grad_y, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _eps = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, grad_y, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(grad_y, x, weight, rstd)
    return dx, dw, None


_rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """y = x / sqrt(mean(x^2, -1) + eps) * weight, accumulated in fp32 (fp64 for fp64 inputs).

    x: (..., N); weight: (N,) of x's dtype or float32. Returns a contiguous tensor of x's dtype.
    """
    if not isinstance(x, Tensor) or x.dim() < 1 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"rms_norm: x must be a floating tensor of at least 1 dim, got "
                         f"{getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
    n = x.shape[-1]
    if not isinstance(weight, Tensor) or weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"rms_norm: weight must have shape ({n},) to match x's last dim, got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"rms_norm: weight dtype {weight.dtype} must equal x's dtype {x.dtype} or be float32")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: x on {x.device} but weight on {weight.device}")
    if weight.stride(0) != 1:
        raise ValueError("rms_norm: weight must be contiguous")
    if not 0 < n <= MAX_NORM_DIM:
        raise ValueError(f"rms_norm: last dim {n} outside the supported range 1..{MAX_NORM_DIM}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"rms_norm: eps must be a non-negative float, got {eps!r}")
    y, _ = _rms_norm_fwd(x, weight, float(eps))
    return y


# --------------------------------------------------------------------------------------------------
# rotary embedding


@torch.library.custom_op("pretrain_kernels::rotary", mutates_args=())
def _rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, transposed: bool) -> tuple[Tensor, Tensor]:
    if _backend.use_triton(q):
        from . import triton_rotary

        with _on(q):
            return triton_rotary.rotary(q, k, cos, sin, transposed)
    return (reference.rotary(q, cos, sin, transposed).contiguous(),
            reference.rotary(k, cos, sin, transposed).contiguous())


@_rotary.register_fake
def _(q, k, cos, sin, transposed):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rotary_setup(ctx, inputs, output):
    q, k, cos, sin, transposed = inputs
    ctx.transposed = transposed
    ctx.table_grad = cos.requires_grad or sin.requires_grad
    # q and k are kept only when the cos/sin tables themselves need gradients (rare).
    ctx.save_for_backward(cos, sin, *((q, k) if ctx.table_grad else ()))


def _rotary_backward(ctx, grad_q, grad_k):
    cos, sin, *qk = ctx.saved_tensors
    dq, dk = _rotary(grad_q, grad_k, cos, sin, not ctx.transposed)
    dcos = dsin = None
    if ctx.table_grad:
        dcos, dsin = _rotary_table_grads(grad_q, grad_k, qk[0], qk[1], ctx.transposed)
        dcos, dsin = dcos.to(cos.dtype), dsin.to(sin.dtype)
    return dq, dk, dcos, dsin, None


def _rotary_table_grads(gq, gk, q, k, transposed):
    ct = reference.compute_dtype(q.dtype)
    dcos = dsin = 0
    for g, x in ((gq.to(ct), q.to(ct)), (gk.to(ct), k.to(ct))):
        dcos = dcos + (g * x).sum((0, 1))
        # forward: <g, rot(x) * s>;  transposed: <g, rot^T(x * s)> = <rot(g), x * s>
        dsin = dsin + ((reference.rotate_half(g) * x) if transposed else (g * reference.rotate_half(x))).sum((0, 1))
    return dcos, dsin


_rotary.register_autograd(_rotary_backward, setup_context=_rotary_setup)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary position embedding on q and k: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1).

    q: (B, Hq, S, D); k: (B, Hkv, S, D); cos, sin: (S, D) (GPT-NeoX / Hugging Face Llama layout),
    of q's dtype or float32. Returns new contiguous (q, k).
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"apply_rotary: {name} must be a 4-D tensor [B, H, S, D], got "
                             f"{getattr(t, 'shape', type(t))}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"apply_rotary: {name} has unsupported dtype {t.dtype}")
    if q.dtype != k.dtype:
        raise ValueError(f"apply_rotary: q and k must share a dtype, got {q.dtype} and {k.dtype}")
    b, _, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"apply_rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, "
                         "sequence length and head dim")
    if d not in HEAD_DIMS:
        raise ValueError(f"apply_rotary: unsupported head dim {d}; supported: {HEAD_DIMS}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (s, d):
            raise ValueError(f"apply_rotary: {name} must have shape (S, D) = ({s}, {d}), got "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if t.dtype not in (q.dtype, torch.float32):
            raise ValueError(f"apply_rotary: {name} dtype {t.dtype} must equal q's dtype {q.dtype} or be float32")
    if cos.dtype != sin.dtype:
        raise ValueError(f"apply_rotary: cos and sin must share a dtype, got {cos.dtype} and {sin.dtype}")
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.stride(-1) != 1:
            raise ValueError(f"apply_rotary: {name} must have a contiguous last dimension, got strides "
                             f"{tuple(t.stride())}; call .contiguous() first")
        if t.device != q.device:
            raise ValueError(f"apply_rotary: {name} on {t.device} but q on {q.device}")
    return _rotary(q, k, cos, sin, False)
