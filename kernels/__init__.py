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

import sys as _sys

if __name__ == "pretrain_kernels":
    from . import reference
    from ._backend import get_backend, interpreting, set_backend
    from .blocks import attention_block_backward, attention_block_forward
    from .ops import HEAD_DIMS, apply_rotary, causal_attention, rms_norm
else:
    # Imported as `kernels`: this folder is on sys.path (the repository root as the working directory)
    # and a library probed for the PyPI package of that name, as transformers does on import. Hand out
    # the one real package: running the files again would define the custom ops a second time, and
    # torch then destroys the first registration, leaving pretrain_kernels' ops dangling (a crash at
    # their next call).
    import importlib as _importlib

    _sys.modules[__name__] = _importlib.import_module("pretrain_kernels")

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
