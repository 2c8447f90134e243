"""The planner: predicted per-GPU memory and step time of a model x parallel plan x cluster, before launch.

``predict(spec, cluster)`` is the whole model; ``python -m pretrain.plan`` (cli.py) builds the ``Spec``
from a composed training config and prints it, and ``--search`` (search.py) ranks the plans that fit.
Memory is that of the most loaded GPU (memory.py), time that of one optimizer step (time.py), the GPU
catalogue and calibrated constants are in gpus.py, the FLOP formulas in spec.py.

``tflops_per_gpu`` counts the FLOPs the GPU executes (recomputation included), as Narayanan et al.
report it; ``mfu`` counts model FLOPs only, ``hfu`` hardware FLOPs, both over the data-sheet peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.plan.gpus import Cluster
from pretrain.plan.memory import GIB, Memory, peak_memory
from pretrain.plan.spec import PlanError, Spec, hardware_flops_per_token, model_flops_per_token, total_params
from pretrain.plan.time import StepTime, step_time


@dataclass(frozen=True)
class Prediction:
    spec: Spec
    cluster: Cluster
    memory: Memory
    time: StepTime

    @property
    def tokens_per_step(self) -> int:
        return self.spec.global_batch * self.spec.seq

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.time.total

    @property
    def tflops_per_gpu(self) -> float:
        return hardware_flops_per_token(self.spec) * self.tokens_per_s / self.spec.gpus / 1e12

    @property
    def mfu(self) -> float:
        return model_flops_per_token(self.spec) * self.tokens_per_s / self.spec.gpus / self.cluster.gpu.peak_flops

    @property
    def hfu(self) -> float:
        return hardware_flops_per_token(self.spec) * self.tokens_per_s / self.spec.gpus / self.cluster.gpu.peak_flops

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.cluster.gpu.memory_gib * GIB

    def as_dict(self) -> dict:
        s = self.spec
        return {
            "gpu": self.cluster.gpu.name, "gpus": s.gpus, "params": total_params(s),
            "plan": {"tensor": s.tp, "pipeline": s.pp, "data": s.dp, "context": s.cp, "zero_stage": s.zero,
                     "sequence_parallel": s.sp, "recompute": s.recompute, "virtual_stages": s.virtual_stages,
                     "micro_batch_size": s.micro_batch, "global_batch_size": s.global_batch,
                     "micro_batches": s.micro_batches, "attention": s.kernel},
            "memory_gib": self.memory.gib(), "memory_stage": self.memory.stage,
            "device_memory_gib": self.cluster.gpu.memory_gib, "fits": self.fits,
            "step_time_s": round(self.time.total, 5), "tokens_per_s": round(self.tokens_per_s, 1),
            "tokens_per_s_per_gpu": round(self.tokens_per_s / s.gpus, 1),
            "tflops_per_gpu": round(self.tflops_per_gpu, 2), "mfu": round(self.mfu, 4), "hfu": round(self.hfu, 4),
            "breakdown_s": self.time.breakdown(),
        }


def predict(spec: Spec, cluster: Cluster) -> Prediction:
    """Memory and step time of ``spec`` on ``cluster``; PlanError when the plan cannot run at all."""
    problems = spec.problems()
    if spec.gpus != cluster.gpus:
        problems.append(f"tensor x pipeline x data x context = {spec.tp}x{spec.pp}x{spec.dp}x{spec.cp} = "
                        f"{spec.gpus} GPUs, but cluster.gpus={cluster.gpus}")
    if spec.tp > cluster.gpus_per_node:
        problems.append(f"tensor={spec.tp} exceeds the {cluster.gpus_per_node} GPUs of a node: TP needs NVLink")
    if problems:
        raise PlanError("the plan cannot run: " + "; ".join(problems))
    return Prediction(spec, cluster, peak_memory(spec, cluster.gpu), step_time(spec, cluster))
