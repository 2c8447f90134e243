"""Selective activation recomputation (Korthikanti et al., 2022): keep a function's inputs, drop
everything it saves for backward, and run it again in backward.

Used for the attention core (QK^T, softmax, dropout, attention over V), whose saved tensors grow
with s^2 per head while its inputs q, k, v are only [b, heads, s, d]. The inputs are kept with
``ctx.save_for_backward``, so saved-tensor hooks see exactly what is held.

Dropout must draw the same mask twice: the recomputation restores the CPU and CUDA generators and
megatron-core's tensor-parallel RNG tracker (which the attention forks so heads differ per TP rank)
to their state before the forward, then puts back the states it found.
"""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker


def _rng_states() -> tuple:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, get_cuda_rng_tracker().get_states()


def _set_rng_states(states: tuple) -> None:
    cpu, cuda, tracker = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    get_cuda_rng_tracker().set_states(tracker)


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, *inputs):
        ctx.function = function
        ctx.rng = _rng_states()
        with torch.no_grad():
            out = function(*inputs)
        ctx.save_for_backward(*inputs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [t if t is None else t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        found = _rng_states()
        _set_rng_states(ctx.rng)
        try:
            with torch.enable_grad():
                out = ctx.function(*inputs)
        finally:
            _set_rng_states(found)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (None, *(next(grads) if t is not None and t.requires_grad else None for t in inputs))


def recompute(function: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """``function(*inputs)`` (one tensor out), keeping only ``inputs`` (tensors or None) for backward."""
    return _Recompute.apply(function, *inputs)
