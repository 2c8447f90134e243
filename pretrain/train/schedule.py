"""The batch schedule: how many sequences each step trains on, at what learning rate, and how many
tokens (so how much data) the run will consume. The only place that decides a batch size.

- Token ramp (GPT-3): ``optim.ramp_start_batch`` sequences growing linearly to the global batch over
  ``optim.ramp_tokens`` tokens.
- Noise-scale ramp (``optim.gns_batch_ramp``): after ``optim.gns_ramp_warmup`` estimates, the measured
  critical batch, between the ramp's start (or micro x dp) and the global batch.
Either way a batch is a multiple of micro-batch x dp, the granularity at which the engine changes
its number of accumulation steps.

The learning-rate horizon follows the batches actually used. With the token ramp it is known before
the run (``planned_tokens``). With the noise-scale ramp it is re-planned every step as the tokens seen
so far plus the remaining steps at this step's batch, and the dataset is sized for the largest run
(every step at the global batch), so the data never runs out whichever batches the noise picks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from pretrain.config import OptimConfig


@dataclass(frozen=True)
class Step:
    """What one optimizer step trains on: ``batch`` sequences at learning rate ``lr``."""

    batch: int
    lr: float


@dataclass(frozen=True)
class BatchSchedule:
    optim: OptimConfig
    global_batch: int
    micro_batch: int
    data_parallel: int
    seq_length: int
    max_steps: int

    @classmethod
    def from_config(cls, cfg) -> "BatchSchedule":
        """From a composed (DictConfig) or typed config with optim, trainer and parallel sections."""
        tr = cfg.trainer
        return cls(cfg.optim, tr.global_batch_size, tr.micro_batch_size, cfg.parallel.data, tr.seq_length, tr.max_steps)

    @property
    def increment(self) -> int:
        """The step between batch sizes: one micro-batch on every data-parallel rank."""
        return self.micro_batch * self.data_parallel

    @property
    def accumulation(self) -> int:
        """Micro-steps per optimizer step at the full global batch (the engine's configured value)."""
        return self.global_batch // self.increment

    def token_ramp(self, tokens: int) -> int:
        """The token-ramp batch once ``tokens`` tokens have been seen."""
        return batch_size_at(tokens, self.optim, self.global_batch, self.increment)

    def batch_at(self, tokens: int, critical: Optional[float] = None, estimates: int = 0) -> int:
        """This step's global batch: the noise-scale ramp once it has enough estimates, else the token ramp."""
        opt = self.optim
        if opt.gns_batch_ramp and critical is not None and estimates >= opt.gns_ramp_warmup:
            low = opt.ramp_start_batch or self.increment
            return max(low, min(self.global_batch, int(critical) // self.increment * self.increment))
        return self.token_ramp(tokens)

    @cached_property
    def planned_tokens(self) -> int:
        """Tokens of the whole run under the token ramp; under the noise-scale ramp, the most it can use."""
        tokens = 0
        for _ in range(self.max_steps):
            tokens += (self.global_batch if self.optim.gns_batch_ramp else self.token_ramp(tokens)) * self.seq_length
        return tokens

    @property
    def train_samples(self) -> int:
        """Sequences the training set must hold for the whole run."""
        return self.planned_tokens // self.seq_length

    def step(self, step: int, tokens: int, critical: Optional[float] = None, estimates: int = 0) -> Step:
        """The batch and learning rate of step ``step + 1``, ``tokens`` having been seen before it."""
        batch = self.batch_at(tokens, critical, estimates)
        horizon = self.planned_tokens
        if self.optim.gns_batch_ramp:
            horizon = tokens + (self.max_steps - step) * batch * self.seq_length
        return Step(batch=batch, lr=lr_at(tokens + batch * self.seq_length, self.optim, horizon))


def batch_size_at(tokens: int, cfg: OptimConfig, global_batch: int, increment: int) -> int:
    """Global batch in sequences: a linear ramp from ramp_start_batch over ramp_tokens tokens.

    Rounded down to a multiple of ``increment`` (micro-batch x dp).
    """
    if cfg.ramp_start_batch is None or cfg.ramp_tokens <= 0 or tokens >= cfg.ramp_tokens:
        return global_batch
    size = cfg.ramp_start_batch + (global_batch - cfg.ramp_start_batch) * tokens / cfg.ramp_tokens
    return max(increment, int(size) // increment * increment)


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
