"""Test-only fault injection, behind one switch: the ``PRETRAIN_TEST_FAULTS`` environment variable.

    PRETRAIN_TEST_FAULTS="nan_steps=3,5,6;step_delay=0.2;crash_in_save=4"

- ``nan_steps``: optimizer steps (1-based) whose training loss is replaced by NaN before backward
  (pp == 1), to exercise the bad-loss gate;
- ``step_delay=SECONDS`` or ``SECONDS@RANK``: sleep after every step, on every rank or on one, so a
  signal lands mid-run deterministically or a rank hangs;
- ``crash_in_save=STEP``: die (``os._exit(86)``) while that step's checkpoint is written, after its
  files and before its commit.

Unset (every real run), ``planned()`` is None and nothing is installed: no hook, no per-step check.
An unknown key or a malformed value is refused by name.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch.distributed as dist
from torch import nn

from pretrain.errors import UserError

SWITCH = "PRETRAIN_TEST_FAULTS"
CRASH_EXIT = 86
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Faults:
    nan_steps: frozenset = frozenset()
    step_delay: float = 0.0
    delay_rank: Optional[int] = None
    crash_in_save: Optional[int] = None

    def install_nan_losses(self, model: nn.Module, next_step: Callable[[], int]) -> None:
        """Make the training loss NaN at the planted steps. Register before the engine's own hooks."""
        if not self.nan_steps:
            return

        def poison(module, inputs, loss):
            if module.training and next_step() in self.nan_steps:
                return loss * float("nan")
            return loss

        model.register_forward_hook(poison)

    def delay(self) -> None:
        if self.step_delay > 0 and (self.delay_rank is None or self.delay_rank == dist.get_rank()):
            time.sleep(self.step_delay)

    def crash_if_planted(self, step: int) -> None:
        if self.crash_in_save == step:
            log.error("%s: dying in the middle of the checkpoint write of step %d (test hook)", SWITCH, step)
            os._exit(CRASH_EXIT)


def planned(environ=None) -> Optional[Faults]:
    """The faults the switch asks for, or None when it is unset."""
    value = (os.environ if environ is None else environ).get(SWITCH, "").strip()
    if not value:
        return None
    fields: dict = {}
    try:
        for item in filter(None, (part.strip() for part in value.split(";"))):
            key, _, text = item.partition("=")
            if key == "nan_steps":
                fields[key] = frozenset(int(s) for s in text.split(",") if s.strip())
            elif key == "step_delay":
                seconds, _, rank = text.partition("@")
                fields.update(step_delay=float(seconds), delay_rank=int(rank) if rank else None)
            elif key == "crash_in_save":
                fields[key] = int(text)
            else:
                raise UserError(f"{SWITCH}: unknown fault {key!r}; known: nan_steps, step_delay, crash_in_save")
    except UserError:
        raise
    except ValueError as err:  # int() / float() of a malformed number
        raise UserError(f"{SWITCH}={value!r}: {err}; e.g. nan_steps=3,5;step_delay=0.2@1;crash_in_save=4") from None
    return Faults(**fields)
