"""What happens around each optimizer step, on every rank: stateful hooks.

The loop (``loop.train``) calls ``after_step`` of each per-step hook with the step's result and
metrics record (hooks add their metrics to it), then asks ``StopHook`` whether to stop and lets
``CheckpointHook`` save. A hook's ``state_dict`` goes into every checkpoint (``TrainState.hooks``) and
comes back on resume, so a resumed run decides exactly as the uninterrupted one would. Logging sinks
are not hooks: they run on rank 0 only (``callbacks``).

Several hooks are collective (an all-reduce); every rank runs every hook every step.
"""

from __future__ import annotations

import logging
import resource
from typing import Optional

import torch
import torch.distributed as dist

from pretrain.checkpoint import store
from pretrain.checkpoint.store import TrainState
from pretrain.engine import compat
from pretrain.engine.core import StepResult
from pretrain.train.faults import EXIT_DIVERGED, EXIT_STOPPED, LossGuard, StopRequest, update_running_mean
from pretrain.train.gns import NoiseScale

log = logging.getLogger(__name__)


class Hook:
    """Runs after every step on every rank; ``name`` keys its state in a checkpoint."""

    name = ""

    def after_step(self, state: TrainState, result: StepResult, record: dict) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, saved: dict) -> None: ...


class Throughput(Hook):
    """Tokens/s, model FLOP/s, MFU and peak memory (the highest over ranks). Collective."""

    name = "throughput"

    def __init__(self, seq_length: int, flops_per_token: float, peak_flops: float):
        self.seq_length, self.flops_per_token, self.peak_flops = seq_length, flops_per_token, peak_flops

    def after_step(self, state, result, record):
        tokens_per_s = record["batch_size"] * self.seq_length / record["step_time_s"]
        achieved = tokens_per_s * self.flops_per_token
        memory = peak_memory_gb()
        highest = torch.tensor(memory, dtype=torch.float64, device=compat.device())
        dist.all_reduce(highest, op=dist.ReduceOp.MAX)
        record.update({
            "tokens_per_s": tokens_per_s,
            "model_tflops_per_s": achieved / 1e12,
            "mfu": achieved / (self.peak_flops * dist.get_world_size()),  # per device: over world_size peaks
            "peak_memory_gb": memory,
            "peak_memory_gb_max_rank": float(highest),
        })
        if result.fwd_bwd_s is not None:
            record.update(fwd_bwd_time_s=result.fwd_bwd_s, optimizer_time_s=result.optimizer_s)


class NoiseScaleHook(Hook):
    """The gradient noise scale from the engine's small- and big-batch gradient norms (``gns``).

    ``critical`` (the latest B_simple, in sequences) and ``estimates`` feed the noise-scale batch ramp.
    """

    name = "noise_scale"

    def __init__(self, seq_length: int):
        self.seq_length = seq_length
        self.gns = NoiseScale()
        self.critical: Optional[float] = None

    @property
    def estimates(self) -> int:
        return self.gns.updates

    def after_step(self, state, result, record):
        if result.local_grad_sq_norm is not None:
            record["grad_norm_local"] = result.local_grad_sq_norm ** 0.5
        batch = record["batch_size"]
        if result.small_batch is not None and result.small_batch < batch:
            metrics = self.gns.update(result.small_batch_sq_norm, result.grad_norm**2, result.small_batch, batch,
                                      self.seq_length)
            self.critical = metrics.get("gns/simple", self.critical)
            record.update(metrics)

    def state_dict(self):
        return {"ema": self.gns.state_dict(), "critical": self.critical}

    def load_state_dict(self, saved):
        self.gns.load_state_dict(saved.get("ema", {}))
        self.critical = saved.get("critical")


class LossGuardHook(Hook):
    """Counts the updates the engine skipped for a bad loss; keeps the running mean the spike check uses.

    ``judge`` is handed to the engine, which asks it once per step on the last pipeline stage.
    """

    name = "loss_guard"

    def __init__(self, spike_factor: float, logs: bool):
        self.guard = LossGuard(spike_factor)
        self.logs = logs

    def judge(self, loss: float) -> Optional[str]:
        return self.guard.judge(loss)

    def after_step(self, state, result, record):
        if result.skipped is None:
            state.consecutive_skips = 0
            self.guard.reference = update_running_mean(self.guard.reference, result.loss)
        else:
            state.skipped_steps += 1
            state.consecutive_skips += 1
            if self.logs:
                log.warning("step %d: update skipped (%s); %d in a row, %d in total",
                            state.step, result.skipped, state.consecutive_skips, state.skipped_steps)
        record["skipped_steps"] = state.skipped_steps

    def state_dict(self):
        return {"reference": self.guard.reference}

    def load_state_dict(self, saved):
        self.guard.reference = saved.get("reference")


class StopHook:
    """Whether the run must stop now: a stop signal on any rank, or too many skipped updates. Collective."""

    def __init__(self, request: StopRequest, max_consecutive_skips: int):
        self.request, self.limit = request, max_consecutive_skips

    def reason(self, state: TrainState) -> Optional[tuple[int, str]]:
        """(exit code, message) or None."""
        received = self.request.agreed()
        if received is not None:
            return EXIT_STOPPED, f"received {received}: stopping; run again to resume"
        if self.limit and state.consecutive_skips >= self.limit:
            return EXIT_DIVERGED, (f"{state.consecutive_skips} updates in a row were skipped for a bad loss "
                                   f"(trainer.max_consecutive_skips={self.limit}); lower the learning rate or check the data")
        return None


class CheckpointHook:
    """Saves every ``interval`` steps, before stopping, and at the end; each step at most once. Collective."""

    def __init__(self, engine, directory: str, interval: int, keep_last: int, save_final: bool, stateful: list[Hook],
                 callbacks, before_commit=None):
        self.engine, self.directory, self.interval, self.keep_last = engine, directory, interval, keep_last
        self.save_final, self.stateful, self.callbacks, self.before_commit = save_final, stateful, callbacks, before_commit
        self.saved_at: Optional[int] = None

    def after_step(self, state: TrainState, stopping: bool) -> None:
        if (self.interval and state.step % self.interval == 0) or stopping:
            self.save(state)

    def at_end(self, state: TrainState) -> None:
        if self.save_final and state.step > 0:
            self.save(state)

    def save(self, state: TrainState) -> None:
        if self.saved_at == state.step:
            return
        state.hooks = {hook.name: hook.state_dict() for hook in self.stateful}
        path = store.save(self.engine, self.directory, state, self.keep_last, before_commit=self.before_commit)
        self.saved_at = state.step
        self.callbacks.on_checkpoint(path, state.step)


def peak_memory_gb() -> float:
    """This process's peak memory: allocated CUDA memory on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
