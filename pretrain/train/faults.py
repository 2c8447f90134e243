"""Surviving preemption and bad steps: stop requests from signals, and skipping updates on a bad loss.

- ``StopRequest``: SIGTERM (scancel, preemption, torchrun shutting its workers down) and SIGUSR1 (Slurm's
  warning before the time limit) only set a flag; the trainer finishes the step, saves, and exits with
  ``EXIT_STOPPED``. A signal may reach a rank twice (slurmstepd and torchrun both forward it) or reach
  ranks at different steps: the flag is idempotent and the ranks agree on it with one all-reduce per step.
- ``UpdateGate``: wraps the optimizer's ``step`` so that an update whose loss is NaN/Inf, or above
  ``spike_factor`` x the running mean of accepted losses, is not applied. DeepSpeed still runs its
  bookkeeping (clipping, copying master weights back, zeroing gradients); the weights and Adam's
  moments stay as they were. The trainer counts skipped steps and stops after too many in a row.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.engine import compat

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint saved; run again to continue
EXIT_DIVERGED = 65  # too many consecutive bad losses; state saved for inspection

# Test hook: comma-separated steps (1-based) whose loss is replaced by NaN before backward (pp == 1).
NAN_ENV = "PRETRAIN_TEST_NAN_STEPS"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Turns stop signals into a flag the training loop polls. Install on every rank's main thread."""

    def __init__(self):
        self.signal: Optional[str] = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        # Only set a flag: the handler may run in the middle of a collective or a checkpoint write.
        if self.signal is None:
            self.signal = signal.Signals(signum).name

    def agreed(self) -> Optional[str]:
        """The signal if any rank has received one, else None. Collective: every rank calls it each step."""
        flag = torch.tensor([0 if self.signal is None else 1], device=compat.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) == 0:
            return None
        return self.signal or "a stop signal (on another rank)"


# Test hook: seconds to sleep after each step, so a signal can be sent deterministically mid-run.
STEP_DELAY_ENV = "PRETRAIN_TEST_STEP_DELAY"


def planted_step_delay() -> None:
    """Test hook: sleep SECONDS after every step, on every rank or (SECONDS@RANK) on one."""
    seconds, _, rank = os.environ.get(STEP_DELAY_ENV, "").partition("@")
    if seconds and float(seconds) > 0 and (not rank or int(rank) == dist.get_rank()):
        time.sleep(float(seconds))


def planted_nan_steps() -> set[int]:
    value = os.environ.get(NAN_ENV, "")
    return {int(s) for s in value.split(",") if s.strip()}


class UpdateGate:
    """Skips optimizer updates on a non-finite or spiking loss. Decides once per step, identically on all ranks.

    Wrap the optimizer before DeepSpeed sees it (``UpdateGate(optimizer)``), then ``attach`` the engine.
    ``reference`` is the running mean of accepted losses (the trainer keeps it in TrainState so a resumed
    run decides as the uninterrupted one would).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, spike_factor: float = 0.0):
        self.spike_factor = spike_factor
        self.reference: Optional[float] = None
        self.skipped_reason: Optional[str] = None
        self._engine = None
        self._decided_at: Optional[int] = None
        self._losses: list[torch.Tensor] = []
        self._nan_steps = planted_nan_steps()
        inner_step = optimizer.step

        def gated_step(*args, **kwargs):
            if self._skip():
                return None
            return inner_step(*args, **kwargs)

        optimizer.step = gated_step

    def attach(self, engine) -> None:
        """``engine``: the TrainEngine. pp == 1 reads the micro-batch losses through a forward hook."""
        self._engine = engine
        if not engine.pipeline:
            engine.module.register_forward_hook(self._record_loss)

    def _step_number(self) -> int:
        return self._engine.ds.global_steps + 1  # DeepSpeed counts every boundary, skipped or not

    def _record_loss(self, module, inputs, loss):
        if not module.training:
            return None
        if self._step_number() in self._nan_steps:
            loss = loss * float("nan")
        self._losses.append(loss.detach().float())
        return loss

    def _step_loss(self) -> Optional[torch.Tensor]:
        """This step's loss averaged over micro-batches and DP on last-stage ranks; None elsewhere."""
        ds = self._engine.ds
        if self._engine.pipeline:
            if not ds.is_last_stage():
                return None
            loss = ds.total_loss.detach().float().clone() / ds.micro_batches
        else:
            loss = torch.stack(self._losses).mean() if self._losses else torch.zeros((), device=compat.device())
            self._losses = []
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        return loss / parallel_state.get_data_parallel_world_size()

    def _skip(self) -> bool:
        step = self._step_number()
        if self._decided_at == step:  # ZeRO-3 calls step once per parameter sub-group
            return self.skipped_reason is not None
        self._decided_at = step
        loss = self._step_loss()
        reason = None if loss is None else self.judge(float(loss))
        flag = torch.tensor([0 if reason is None else 1], device=compat.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) and reason is None:
            reason = "bad loss on another pipeline stage"
        self.skipped_reason = reason
        return reason is not None

    def judge(self, loss: float) -> Optional[str]:
        """Why an update with this loss should be skipped, or None to apply it."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if self.spike_factor > 0 and self.reference is not None and loss > self.spike_factor * self.reference:
            return f"loss {loss:.4g} is above {self.spike_factor:g} x its running mean {self.reference:.4g}"
        return None

    def take_result(self) -> Optional[str]:
        """The reason the last step's update was skipped (None if applied); resets it."""
        reason, self.skipped_reason = self.skipped_reason, None
        return reason


def update_running_mean(mean: Optional[float], loss: float, beta: float = 0.9) -> float:
    """Exponential running mean of accepted losses (about the last 10 steps)."""
    return loss if mean is None else beta * mean + (1 - beta) * loss
