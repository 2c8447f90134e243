"""DeepSpeed runs the optimisation: ZeRO over the data-parallel group, bf16 with fp32 master weights,
gradient accumulation and clipping, and the 1F1B pipeline schedule when pp > 1.

``TrainEngine.train_step`` takes the micro-batches of one optimizer step for this rank and returns
the step's loss and the global gradient norm, identically for the plain and the pipeline engine;
given a ``judge``, it skips the update of a bad step (``gate``). ``load_full_state`` fills the
optimizers from layout-free tensors when a checkpoint changes layout (``full_state``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from pretrain.checkpoint import safeload
from pretrain.config import OptimConfig, ParallelConfig, TrainerConfig
from pretrain.engine import compat, full_state
from pretrain.engine.gate import Judge, UpdateGate
from pretrain.engine.groups import MegatronMPU, data_group
from pretrain.engine.layout import describe, model_shapes

Batch = tuple[torch.Tensor, torch.Tensor]  # tokens [b, s], labels [b, s]


def effective_zero_stage(parallel: ParallelConfig, precision: str) -> int:
    """bf16 needs DeepSpeed's fp32-master optimizers, which come with ZeRO >= 1.

    (Stage 0 bf16 uses an optimizer that takes a dummy Adam step at start-up and drifts from the
    fp32-master reference.) ZeRO-1 at dp == 1 partitions nothing; it only keeps the master copy.
    """
    if precision == "bf16":
        return max(1, parallel.zero_stage)
    return parallel.zero_stage


def deepspeed_config(parallel: ParallelConfig, trainer: TrainerConfig, optim: OptimConfig, grad_accum: int) -> dict:
    stage = effective_zero_stage(parallel, trainer.precision)
    bf16 = trainer.precision == "bf16"
    config = {
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        # DeepSpeed counts a sequence once per context rank: its data parallelism is data x context.
        "train_batch_size": trainer.micro_batch_size * grad_accum * parallel.data * parallel.context,
        # An infinite threshold computes the norm without clipping.
        "gradient_clipping": optim.grad_clip if optim.grad_clip > 0 else math.inf,
        "zero_optimization": {"stage": stage, **overlap(parallel, stage)},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16 and stage == 1:
        # Accumulate gradients in fp32 (BF16_Optimizer); stages 2/3 reduce into fp32 partitions.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def overlap(parallel: ParallelConfig, stage: int) -> dict:
    """DeepSpeed's ZeRO communication settings from the plan (none at stage 0: nothing is bucketed)."""
    if stage == 0:
        return {}
    return {"overlap_comm": parallel.overlap_comm, "contiguous_gradients": parallel.contiguous_gradients,
            "reduce_bucket_size": parallel.reduce_bucket_size, "allgather_bucket_size": parallel.allgather_bucket_size}


def apply_sequence_parallel_grad_sync(model: nn.Module) -> None:
    """All-reduce over TP the gradients of parameters used on sequence shards (norms, row biases).

    Each TP rank sees a different slice of the sequence, so those gradients are partial sums.
    megatron-core leaves this to its own optimizer; under DeepSpeed a gradient hook does it, before
    DeepSpeed's accumulation hooks see the gradient (every ZeRO stage).
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    group = parallel_state.get_tensor_model_parallel_group()

    def reduce(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for p in model.parameters():
        if getattr(p, "sequence_parallel", False):
            p.register_hook(reduce)


def counts_once(p: nn.Parameter) -> bool:
    """Whether this rank's copy of p counts in a full-model norm: TP-split parameters on every TP
    rank, replicated ones on TP rank 0 only, pipeline copies of tied weights on their owner only."""
    if getattr(p, "ds_pipe_replicated", False):
        return False
    return parallel_state.get_tensor_model_parallel_rank() == 0 or getattr(p, "tensor_model_parallel", False)


def model_parallel_sq_sum(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of the given gradient pieces over TP x PP. Every rank of the group calls it."""
    total = torch.zeros((), dtype=torch.float32, device=compat.device())
    for g in grads:
        total += g.detach().float().pow(2).sum()
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return total


def global_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """L2 norm of the full model's gradient, from the parts this rank holds. Every rank calls it."""
    return model_parallel_sq_sum([p.grad for p in params if counts_once(p)]).sqrt()


class LocalGradTap:
    """This DP rank's own gradient for the step, read before the data-parallel reduction.

    Reports its squared L2 norm over the whole model (summed over TP and PP), at the same weights
    as the global gradient: the small-batch half of the gradient-noise-scale estimate.

    - pp == 1: a tensor hook on each parameter receives every micro-step's incoming gradient
      before it is accumulated, so before DeepSpeed's accumulation hooks (which reduce, and at
      ZeRO-2 move the gradient out every micro-step). The micro-step gradients are summed in an
      fp32 buffer here, identically at every ZeRO stage and precision (one fp32 copy of this
      rank's gradients, only when enabled). Under sequence parallelism the TP all-reduce hook
      was registered first, so the buffer holds whole gradients.
    - pp > 1: the pipeline engine's ReduceGrads instruction is wrapped; when it runs, the
      parameters hold the accumulated local gradients with tied copies already summed
      (bf16: the fp32 ``_hp_grad``).

    Under context parallelism each rank's gradient is that of its share of the sequences; the DP
    rank's own gradient is their mean over the context group, taken here (one extra all-reduce of
    the gradients per tap, only when the noise scale is logged).
    """

    def __init__(self, model: nn.Module, pipeline: bool, track_micro_steps: bool = False):
        self.pipeline = pipeline
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._buffers: dict[nn.Parameter, torch.Tensor] = {}
        self.value: Optional[float] = None
        # dp == 1: the micro-batch gradients are the small batch of the noise scale.
        self.track_micro_steps = track_micro_steps and not pipeline
        self._micro: dict[nn.Parameter, torch.Tensor] = {}
        self.micro_sq: list[float] = []
        if not pipeline:
            for p in self.params:
                p.register_hook(partial(self._accumulate, p))

    def _accumulate(self, p: nn.Parameter, grad: torch.Tensor) -> None:
        buffers = self._micro if self.track_micro_steps else self._buffers
        buf = buffers.get(p)
        if buf is None:
            buffers[p] = grad.detach().float().clone()
        else:
            buf.add_(grad.detach().float())

    @staticmethod
    def _over_context(grads: list[torch.Tensor], in_place: bool) -> list[torch.Tensor]:
        """The mean of each gradient over the context-parallel group (the whole sequences'), or the
        gradients themselves without context parallelism. Collective over the group."""
        cp = parallel_state.get_context_parallel_world_size()
        if cp == 1:
            return grads
        out = []
        for g in grads:
            g = g if in_place else g.detach().float().clone()
            dist.all_reduce(g, group=parallel_state.get_context_parallel_group())
            out.append(g.div_(cp))
        return out

    def end_micro_step(self) -> None:
        """Fold one micro-step's gradient into the step's, keeping its squared norm. Collective."""
        if not self.track_micro_steps:
            return
        self._over_context(list(self._micro.values()), in_place=True)
        self.micro_sq.append(float(model_parallel_sq_sum([g for p, g in self._micro.items() if counts_once(p)])))
        for p, g in self._micro.items():
            if p in self._buffers:
                self._buffers[p].add_(g)
            else:
                self._buffers[p] = g
        self._micro = {}

    def wrap_pipeline(self, engine) -> None:
        from deepspeed.runtime.pipe import schedule

        # The engine dispatches through a class-level map; give this instance its own copy.
        engine._INSTRUCTION_MAP = dict(engine._INSTRUCTION_MAP)
        reduce_grads = engine._INSTRUCTION_MAP[schedule.ReduceGrads]

        def read_then_reduce(eng, **kwargs):
            grads = []
            for p in self.params:
                g = getattr(p, "_hp_grad", None)
                g = p.grad if g is None else g
                if g is not None and counts_once(p):
                    grads.append(g)
            self.value = float(model_parallel_sq_sum(self._over_context(grads, in_place=False)))
            return reduce_grads(eng, **kwargs)

        engine._INSTRUCTION_MAP[schedule.ReduceGrads] = read_then_reduce

    def start_step(self) -> None:
        self._buffers.clear()
        self._micro = {}
        self.micro_sq = []
        self.value = None

    def finish_step(self) -> float:
        """Squared norm of the step's local gradient (mean over this rank's micro-batches). Collective."""
        if not self.pipeline:
            if not self.track_micro_steps:  # tracked micro-steps were averaged as they ended
                self._over_context(list(self._buffers.values()), in_place=True)
            # DeepSpeed scales each micro-step's loss by 1/accumulation already.
            self.value = float(model_parallel_sq_sum([g for p, g in self._buffers.items() if counts_once(p)]))
            self._buffers.clear()
        return self.value


@dataclass
class StepResult:
    loss: float
    grad_norm: float  # of the global (DP-averaged) gradient, before clipping
    # Squared norm of this DP rank's own gradient before the DP reduction (LocalGradTap), if tapped.
    local_grad_sq_norm: Optional[float] = None
    # The noise scale's small batch: its mean squared gradient norm and its size in examples.
    small_batch_sq_norm: Optional[float] = None
    small_batch: Optional[int] = None
    fwd_bwd_s: Optional[float] = None  # pp == 1 only; the pipeline interleaves them
    optimizer_s: Optional[float] = None
    skipped: Optional[str] = None  # why the update was not applied (the judge's reason); None if applied


class TrainEngine:
    """One DeepSpeed engine (plain or pipeline) behind a small interface. All ranks call every method."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, config: dict, parallel: ParallelConfig,
        tap_local_grads: bool = False, judge: Optional[Judge] = None,
    ):
        """``judge(loss)``: the reason to skip the update of a step with that loss (averaged over
        micro-batches and DP), or None to apply it; without one every update is applied."""
        self.pipeline = parallel.pipeline > 1
        self.context = parallel.context
        self.tap = LocalGradTap(model, self.pipeline, track_micro_steps=parallel.data == 1) if tap_local_grads else None
        # Around the torch optimizer's step, before DeepSpeed wraps that optimizer.
        self.gate = None if judge is None else UpdateGate(optimizer, judge)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=config,
            mpu=None if self.pipeline else MegatronMPU(),  # the pipeline module brings its own grid
        )
        if self.tap is not None and self.pipeline:
            self.tap.wrap_pipeline(self.ds)
        if self.gate is not None:
            self.gate.attach(self.ds, self.pipeline)
        # DeepSpeed's loader would unpickle anything; every file it reads goes through the weights-only one.
        self.ds.checkpoint_engine.load = safeload.load_for_deepspeed
        self.zero_stage = config["zero_optimization"]["stage"]
        self.bf16 = config["bf16"]["enabled"]
        # What a checkpoint of this engine depends on; resuming at another layout goes through reshard.py.
        self.layout = {
            "tensor": parallel.tensor, "pipeline": parallel.pipeline, "data": parallel.data, "context": parallel.context,
            "zero_stage": self.zero_stage, "precision": "bf16" if self.bf16 else "fp32",
        }
        self.shapes = model_shapes(self.module)  # {canonical name: full shape} of the whole model
        self._fp32_norm: Optional[float] = None
        if not (self.ds.zero_optimization() or self.ds.bfloat16_enabled()):
            # Without ZeRO/bf16, DeepSpeed's own fp32 clipping discards the norm and counts the
            # pipeline's tied-embedding copies twice; clip here instead (its ZeRO/bf16 optimizers
            # get both right).
            self.ds.clip_fp32_gradients = self._clip_fp32_gradients

    def _clip_fp32_gradients(self) -> None:
        params = [p for p in self.ds.module.parameters() if p.grad is not None]
        self._fp32_norm = float(global_grad_norm(params))
        clip = self.ds.gradient_clipping()
        if math.isfinite(clip) and self._fp32_norm > clip:
            for p in params:
                p.grad.mul_(clip / (self._fp32_norm + 1e-6))

    @property
    def device(self) -> torch.device:
        return compat.device()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def set_global_batch(self, sequences: int) -> None:
        sequences *= self.context  # DeepSpeed's count (see deepspeed_config)
        if sequences != self.ds.train_batch_size():
            self.ds.set_train_batch_size(sequences)

    def train_step(self, micro_batches: list[Batch]) -> StepResult:
        """One optimizer step over this rank's micro-batches; loss averaged over micro-batches and DP."""
        self.ds.train()
        if self.tap is not None:
            self.tap.start_step()
        fwd_bwd = optimizer = None
        if self.pipeline:
            loss = self.ds.train_batch(iter(micro_batches))
        else:
            total = torch.zeros((), device=self.device)
            fwd_bwd = optimizer = 0.0
            for tokens, labels in micro_batches:
                start = time.perf_counter()
                loss = self.ds(tokens, labels)
                self.ds.backward(loss)
                if self.tap is not None:
                    self.tap.end_micro_step()
                middle = time.perf_counter()
                self.ds.step()  # the optimizer step at the accumulation boundary
                optimizer += time.perf_counter() - middle
                fwd_bwd += middle - start
                total += loss.detach().float()
            loss = total / len(micro_batches)
            dist.all_reduce(loss, group=data_group())  # context ranks hold equal shares of the tokens
            loss /= dist.get_world_size(data_group())
        norm = self.ds.get_global_grad_norm()
        norm = float(self._fp32_norm if norm is None else norm)
        result = StepResult(loss=float(loss), grad_norm=norm, fwd_bwd_s=fwd_bwd, optimizer_s=optimizer)
        if self.gate is not None:
            result.skipped = self.gate.take_result()
        if self.tap is not None:
            result.local_grad_sq_norm = self.tap.finish_step()
            result.small_batch_sq_norm, result.small_batch = self._small_batch(result.local_grad_sq_norm, len(micro_batches))
        return result

    def _small_batch(self, local_sq: float, accum: int) -> tuple[Optional[float], Optional[int]]:
        """(mean squared norm, examples) of the noise scale's small batch; (None, None) if there is none."""
        micro = self.ds.train_micro_batch_size_per_gpu()
        dp = parallel_state.get_data_parallel_world_size()
        if dp > 1:
            mean = torch.tensor(local_sq, dtype=torch.float64, device=self.device)
            dist.all_reduce(mean, group=parallel_state.get_data_parallel_group())
            return float(mean) / dp, micro * accum
        if self.tap.track_micro_steps and accum > 1:
            # Each micro-step's loss was scaled by 1/accum: rescale to the micro-batch mean gradient.
            return accum**2 * sum(self.tap.micro_sq) / len(self.tap.micro_sq), micro
        return None, None

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[Batch]) -> float:
        """Mean loss over this rank's micro-batches, averaged over DP. No parameter changes."""
        self.ds.eval()
        if self.pipeline:
            loss = self.ds.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches))
        else:
            loss = sum(self.ds(tokens, labels).float() for tokens, labels in micro_batches) / len(micro_batches)
            dist.all_reduce(loss, group=data_group())
            loss /= dist.get_world_size(data_group())
        self.ds.train()
        return float(loss)

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        """DeepSpeed's checkpoint plus this rank's layout and parameter table (layout.describe)."""
        ranks = {"tp_rank": parallel_state.get_tensor_model_parallel_rank(),
                 "pp_rank": parallel_state.get_pipeline_model_parallel_rank()}
        client_state = {**client_state, "layout": {**self.layout, **ranks}, "parameters": describe(self.module, self.optimizer)}
        self.ds.save_checkpoint(directory, tag=tag, client_state=client_state)

    def restore_counters(self, steps: int, samples: int) -> None:
        """Set DeepSpeed's step and sample counters after a load that bypassed its load_checkpoint."""
        self.ds.global_steps = steps
        self.ds.global_samples = samples

    def load(self, directory: str, tag: Optional[str] = None) -> Optional[dict]:
        path, client_state = self.ds.load_checkpoint(directory, tag=tag)
        return None if path is None else client_state

    def load_full_state(self, read: Callable[[str, str, nn.Parameter], torch.Tensor], step: float) -> None:
        """Set weights, fp32 masters and Adam moments from layout-free tensors, and Adam's step count.

        ``read(state, canonical name, parameter)`` returns this TP rank's slice of that state
        ("fp32", "exp_avg" or "exp_avg_sq"). Every rank calls it, instead of ``load``.
        """
        full_state.load_full_state(self, read, step)

    @property
    def module(self) -> nn.Module:
        return self.ds.module
