"""Context parallelism inside the model: which tokens of each sequence this rank holds.

With ``parallel.context=N`` every rank of a context-parallel group receives the same full
micro-batch (tokens and labels ``[b, s]``). The sequence is cut into 2N equal chunks and rank r
keeps chunks r and 2N-1-r (``ring_attention.chunk_positions``): causal attention then costs every
rank the same. The model shards its inputs where they enter (token ids in the embedding, labels in
the loss, document ids before the first block), gives positional encodings the absolute positions
of the kept tokens, and runs attention as a ring over the group (``ring_attention``). Everything
else (norms, MLPs, TP layers) is per token and unchanged; weights are replicated over the group and
their gradients averaged with the data-parallel ones (``pretrain.engine.groups``).

Without context parallelism (or before the process groups exist, as in the inference tools) every
function here is the identity.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state

from pretrain.model import ring_attention


def world_size() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


def shard(x: Optional[torch.Tensor], dim: int) -> Optional[torch.Tensor]:
    """The full sequence along ``dim`` -> this rank's two chunks (None stays None)."""
    cp = world_size()
    if x is None or cp == 1:
        return x
    return ring_attention.shard_sequence(x, dim, cp, parallel_state.get_context_parallel_rank())


def positions(local_len: int, device) -> torch.Tensor:
    """Absolute positions of this rank's ``local_len`` tokens in the full sequence."""
    cp = world_size()
    if cp == 1:
        return torch.arange(local_len, device=device)
    return ring_attention.chunk_positions(local_len * cp, cp, parallel_state.get_context_parallel_rank()).to(device)


@torch.compiler.disable  # point-to-point communication inside; the compiled blocks call it eagerly
def attention(q, k, v, window: Optional[int], segments: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence's keys, as a ring over the group."""
    return ring_attention.ring_attention(q, k, v, group=parallel_state.get_context_parallel_group(), window=window,
                                         segments=segments, backend=backend)
