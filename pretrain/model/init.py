"""Layout-independent weight initialisation.

Each parameter's full (unsharded) tensor is drawn from a generator seeded by the run seed and the
parameter's canonical name; a TP rank keeps its slice. So initial weights depend only on the seed
and the model, never on tp/pp/dp, and layouts can be compared step for step.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.model.gpt import canonical_parameters
from pretrain.model.weights import full_shape, shard


def init_full_tensor(name: str, p: nn.Parameter, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """GPT-2 init: N(0, std) matrices, residual outputs scaled by 1/sqrt(2 L), norms 1, biases 0."""
    shape = full_shape(p)
    if p.ndim == 1:  # the only 1-D weights are norm gains; every 1-D ".bias" starts at zero
        return torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)
    std = cfg.init_std
    if cfg.scale_residual_init and getattr(p, "residual_output", False):
        std /= math.sqrt(2 * cfg.num_layers)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape).normal_(0.0, std, generator=gen)


@torch.no_grad()
def apply_init(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Fill every parameter this rank holds. Call on every rank before deepspeed.initialize."""
    for name, p in canonical_parameters(model):
        p.copy_(shard(init_full_tensor(name, p, cfg, seed), p).to(p.dtype))
