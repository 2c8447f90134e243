"""AdamW parameter groups and the token-counted schedules (learning rate, batch-size ramp)."""

from __future__ import annotations

import math

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


def lr_at(tokens: int, cfg: OptimConfig, total_tokens: int) -> float:
    """GPT-3 schedule in tokens: linear warmup, cosine to min_lr_ratio * lr, then constant.

    ``tokens`` counts the tokens seen once the current step's batch is consumed, so the first
    step of a warmup already has a non-zero rate.
    """
    if cfg.warmup_tokens and tokens < cfg.warmup_tokens:
        return cfg.lr * tokens / cfg.warmup_tokens
    decay_end = cfg.decay_tokens or total_tokens
    min_lr = cfg.lr * cfg.min_lr_ratio
    if decay_end <= cfg.warmup_tokens:
        return cfg.lr
    progress = min(1.0, (tokens - cfg.warmup_tokens) / (decay_end - cfg.warmup_tokens))
    return min_lr + (cfg.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_size_at(tokens: int, cfg: OptimConfig, global_batch: int, increment: int) -> int:
    """Global batch in sequences: a linear ramp from ramp_start_batch over ramp_tokens tokens.

    Rounded down to a multiple of ``increment`` (micro-batch x dp), the granularity at which the
    engine can change its number of accumulation steps.
    """
    if cfg.ramp_start_batch is None or cfg.ramp_tokens <= 0 or tokens >= cfg.ramp_tokens:
        return global_batch
    size = cfg.ramp_start_batch + (global_batch - cfg.ramp_start_batch) * tokens / cfg.ramp_tokens
    return max(increment, int(size) // increment * increment)
