"""Full (layout-free) tensors and their tensor-parallel slices: the one place that knows how a TP rank's
piece of a parameter relates to the whole, and the one check that a set of weights fits a model.

A TP-split parameter carries megatron-core's tags: ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``. With stride k the full tensor is k stacked parts (SwiGLU's [gate; up]) and
TP rank r holds chunk r of each part.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from megatron.core import parallel_state
from torch import nn


def is_split(p: nn.Parameter) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def full_shape(p: nn.Parameter) -> list[int]:
    """Unsharded shape of p (also under ZeRO-3, where p itself is partitioned away: ``ds_shape``)."""
    shape = list(getattr(p, "ds_shape", p.shape))
    if is_split(p):
        shape[p.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return shape


def _ranges(size: int, stride: int, tp: int, rank: int) -> list[tuple[int, int]]:
    """[start, stop) along the split dim of each of this rank's ``stride`` pieces of a full tensor."""
    part = size // stride
    chunk = part // tp
    return [(j * part + rank * chunk, j * part + (rank + 1) * chunk) for j in range(stride)]


def shard(full: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
    """This TP rank's slice of a full tensor for parameter p."""
    return read_shard(lambda index: full[index], list(full.shape), p)


def read_shard(read: Callable[[tuple], torch.Tensor], shape: Sequence[int], p: nn.Parameter) -> torch.Tensor:
    """This TP rank's slice of a full tensor of ``shape`` that ``read(index)`` returns piece by piece.

    ``read`` may be a lazy view (safetensors' ``get_slice``), so only this rank's bytes are read.
    """
    if not is_split(p):
        return read(tuple(slice(None) for _ in shape))
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    dim = p.partition_dim
    pieces = []
    for start, stop in _ranges(shape[dim], getattr(p, "partition_stride", 1), tp, rank):
        index = [slice(None)] * len(shape)
        index[dim] = slice(start, stop)
        pieces.append(read(tuple(index)))
    return torch.cat(pieces, dim=dim)


def gather(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of ``shard``: the full tensor from every TP rank's slice, in rank order."""
    parts = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([torch.cat([p[j] for p in parts], dim=dim) for j in range(stride)], dim=dim)


def gathered_full_shapes(named: Iterable[tuple[str, nn.Parameter]]) -> dict[str, list[int]]:
    """{canonical name: full shape} of the parameters every rank holds (a pipeline stage holds only its own).

    Collective over the default process group when one is initialized: every rank calls it.
    """
    import torch.distributed as dist

    local = {name: full_shape(p) for name, p in named}
    if not dist.is_initialized():
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {name: shape for part in parts for name, shape in part.items()}


def misfits(stored: dict[str, Sequence[int]], wanted: dict[str, Sequence[int]]) -> list[str]:
    """Each parameter whose presence or full shape differs between stored weights and a model, named."""
    problems = []
    for name, want in wanted.items():
        if name not in stored:
            problems.append(f"{name} is not in the checkpoint")
        elif list(stored[name]) != list(want):
            problems.append(f"{name} has shape {list(stored[name])} in the checkpoint but {list(want)} in the model")
    problems += [f"{name} is in the checkpoint but not in the model" for name in sorted(set(stored) - set(wanted))]
    return problems


def check_fits(stored: dict[str, Sequence[int]], wanted: dict[str, Sequence[int]], source, error: type[Exception],
               advice: Optional[str] = None) -> None:
    """Raise ``error`` naming (up to six of) the parameters of ``source`` that do not fit the model."""
    problems = misfits(stored, wanted)
    if problems:
        raise error(
            f"checkpoint {source} does not fit the configured model: " + "; ".join(problems[:6])
            + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "")
            + f". {advice or 'Use the model config the weights were trained with'}"
        )
