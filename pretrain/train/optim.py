"""AdamW: its parameter groups (what decays) and the implementation picked for the machine."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config import OptimConfig

_EMBEDDINGS = ("embed.word.weight", "embed_out.pos.weight")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on matrices; none on biases and norm gains (and embeddings if so configured)."""
    decay, no_decay = [], []
    from pretrain.model.gpt import canonical_parameters  # lazy: validation imports this module for the schedules

    for name, p in canonical_parameters(model):
        if p.ndim < 2 or (not cfg.decay_embeddings and name in _EMBEDDINGS):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW: apex's FusedAdam on GPU when the image has apex, else torch's (fused on CUDA).

    Never DeepSpeed's FusedAdam/CPUAdam: they JIT-compile C++ on first use (minutes on CPU).
    """
    groups = param_groups(model, cfg)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if torch.cuda.is_available():
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        except ImportError:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
