"""Surviving preemption and bad steps: stop requests from signals, and skipping updates on a bad loss.

- ``StopRequest``: SIGTERM (scancel, preemption, torchrun shutting its workers down) and SIGUSR1 (Slurm's
  warning before the time limit) only set a flag; the trainer finishes the step, saves, and exits with
  ``EXIT_STOPPED``. A signal may reach a rank twice (slurmstepd and torchrun both forward it) or reach
  ranks at different steps: the flag is idempotent and the ranks agree on it with one all-reduce per step.
- ``LossGuard``: the policy for a bad loss. An update whose loss is NaN/Inf, or above ``spike_factor`` x
  the running mean of accepted losses, is not applied: ``LossGuard.judge`` is handed to ``TrainEngine``
  (``judge=``), which skips the update on every rank and reports it in ``StepResult.skipped``. The
  trainer counts skipped steps and stops after too many in a row.
"""

from __future__ import annotations

import logging
import math
import signal
from typing import Optional

import torch
import torch.distributed as dist

from pretrain.engine import compat

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint saved; run again to continue
EXIT_DIVERGED = 65  # too many consecutive bad losses; state saved for inspection

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


class LossGuard:
    """Whether a step's loss is bad enough to skip its update: non-finite, or a spike.

    ``reference`` is the running mean of accepted losses (the trainer keeps it in TrainState so a
    resumed run decides as the uninterrupted one would); ``spike_factor`` 0 disables the spike check.
    """

    def __init__(self, spike_factor: float = 0.0):
        self.spike_factor = spike_factor
        self.reference: Optional[float] = None

    def judge(self, loss: float) -> Optional[str]:
        """Why an update with this loss should be skipped, or None to apply it."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if self.spike_factor > 0 and self.reference is not None and loss > self.spike_factor * self.reference:
            return f"loss {loss:.4g} is above {self.spike_factor:g} x its running mean {self.reference:.4g}"
        return None


def update_running_mean(mean: Optional[float], loss: float, beta: float = 0.9) -> float:
    """Exponential running mean of accepted losses (about the last 10 steps)."""
    return loss if mean is None else beta * mean + (1 - beta) * loss
