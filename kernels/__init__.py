"""Triton kernels for pretraining: causal attention (FlashAttention-2 style), RMSNorm, rotary embedding.

Installed as `pretrain_kernels` (the PyPI name `kernels` belongs to another project)::

    import pretrain_kernels as pk
    out = pk.causal_attention(q, k, v, window=None)      # q (B, Hq, S, D), k/v (B, Hkv, S, D)
    y = pk.rms_norm(x, weight, eps)
    q, k = pk.apply_rotary(q, k, cos, sin)               # cos/sin (S, D), rotate-half convention
    out, lse = pk.attention_block_forward(q, k, v, q_start=0, k_start=0)  # one ring-attention block
    pk.set_backend("auto" | "triton" | "reference")      # or env PRETRAIN_KERNELS_BACKEND

See README.md in this folder for the algorithms, memory traffic and FLOP counts.
"""

from . import reference
from ._backend import get_backend, interpreting, set_backend
from .blocks import attention_block_backward, attention_block_forward
from .ops import HEAD_DIMS, apply_rotary, causal_attention, rms_norm

__all__ = [
    "HEAD_DIMS",
    "apply_rotary",
    "attention_block_backward",
    "attention_block_forward",
    "causal_attention",
    "get_backend",
    "interpreting",
    "reference",
    "rms_norm",
    "set_backend",
]
