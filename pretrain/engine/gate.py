"""Skipping an optimizer update on a bad loss, decided once per step and identically on every rank.

``UpdateGate`` wraps the torch optimizer's ``step`` before DeepSpeed sees it, so DeepSpeed still runs
its bookkeeping around the skipped call (clipping, copying master weights back, zeroing gradients)
while the weights and Adam's moments stay as they were. What counts as a bad loss is the caller's
policy (``judge``); ``TrainEngine`` builds the gate and reports its decision in ``StepResult.skipped``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.engine import compat

# Given the step's loss, the reason to skip its update, or None to apply it.
Judge = Callable[[float], Optional[str]]


class UpdateGate:
    """Wrap the optimizer (``UpdateGate(optimizer, judge)``), then ``attach`` the DeepSpeed engine.

    The loss judged is the step's, averaged over micro-batches and DP, on last-stage ranks; every rank
    takes the decision of any rank that skips ("bad loss on another pipeline stage").
    """

    def __init__(self, optimizer: torch.optim.Optimizer, judge: Judge):
        self.judge = judge
        self.skipped_reason: Optional[str] = None
        self._ds = None
        self._pipeline = False
        self._decided_at: Optional[int] = None
        self._losses: list[torch.Tensor] = []
        inner_step = optimizer.step

        def gated_step(*args, **kwargs):
            if self._skip():
                return None
            return inner_step(*args, **kwargs)

        optimizer.step = gated_step

    def attach(self, ds, pipeline: bool) -> None:
        """``ds``: the engine ``deepspeed.initialize`` returned. pp == 1 reads the micro-batch losses
        through a forward hook, registered now so that it sees the loss as earlier hooks left it."""
        self._ds, self._pipeline = ds, pipeline
        if not pipeline:
            ds.module.register_forward_hook(self._record_loss)

    def _record_loss(self, module, inputs, loss) -> None:
        if module.training:
            self._losses.append(loss.detach().float())

    def _step_loss(self) -> Optional[torch.Tensor]:
        """This step's loss averaged over micro-batches and DP on last-stage ranks; None elsewhere."""
        ds = self._ds
        if self._pipeline:
            if not ds.is_last_stage():
                return None
            loss = ds.total_loss.detach().float().clone() / ds.micro_batches
        else:
            loss = torch.stack(self._losses).mean() if self._losses else torch.zeros((), device=compat.device())
            self._losses = []
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        return loss / parallel_state.get_data_parallel_world_size()

    def _skip(self) -> bool:
        step = self._ds.global_steps  # DeepSpeed counts every boundary, skipped or not
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

    def take_result(self) -> Optional[str]:
        """The reason the last step's update was skipped (None if applied); resets it."""
        reason, self.skipped_reason = self.skipped_reason, None
        return reason
