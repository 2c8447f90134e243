"""The pre-launch memory check: before any process group or model exists, predict the per-GPU memory
of the configured plan and refuse (``planner.check=refuse``, exit 2) or warn when it exceeds the
device's memory by more than ``planner.margin``, naming the largest term and the cheapest single change
that fits (the one with the highest predicted tokens/s).

The GPU is ``planner.gpu`` (a catalogue name; the Slurm launcher passes the cluster file's ``gpu``) or
the CUDA device the process sees; without either (a CPU run) there is nothing to check.
"""

from __future__ import annotations

import logging
from typing import Optional

from pretrain.plan import Prediction, predict
from pretrain.plan.gpus import ClusterError, load_cluster
from pretrain.plan.memory import GIB
from pretrain.plan.spec import PlanError, Spec, from_config

log = logging.getLogger(__name__)

# torch.cuda.get_device_name() fragments -> catalogue names (A100s told apart by their memory).
DEVICE_NAMES = (("H200", "H200"), ("B200", "B200"), ("H100", "H100-SXM"))


def detect_gpu() -> Optional[str]:
    """The catalogue name of this process's CUDA device, or None (no CUDA, or a GPU the catalogue lacks)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for fragment, known in DEVICE_NAMES:
        if fragment in name:
            return known
    if "A100" in name:
        return "A100-80GB" if torch.cuda.get_device_properties(0).total_memory > 50 * 2**30 else "A100-40GB"
    return None


def _changes(spec: Spec) -> list[tuple[str, Spec]]:
    """Single-knob changes that lower memory, each as the override a user would type."""
    out = []
    if spec.recompute != "full":
        out.append(("parallel.activation_checkpointing=full", spec.with_(recompute="full")))
    for stage in range(spec.zero + 1, 4):
        if not (stage >= 2 and spec.pp > 1):  # DeepSpeed's pipeline takes ZeRO 0-1 only
            out.append((f"parallel.zero_stage={stage}", spec.with_(zero=stage)))
    if spec.tp > 1 and not spec.sp:
        out.append(("parallel.sequence_parallel=true", spec.with_(sp=True)))
    if spec.dp % 2 == 0:  # the same GPUs, each sequence over twice the ranks: activations halve
        cp, dp = 2 * spec.cp, spec.dp // 2
        out.append((f"parallel.context={cp} parallel.data={dp}", spec.with_(cp=cp, dp=dp)))
    micro = spec.micro_batch // 2
    while micro >= 1:
        out.append((f"trainer.micro_batch_size={micro}", spec.with_(micro_batch=micro)))
        micro //= 2
    return out


def cheapest_fit(pred: Prediction, limit: float) -> Optional[tuple[str, Prediction]]:
    """(override, prediction) of the fastest single change whose memory is within ``limit`` bytes."""
    fits = []
    for override, spec in _changes(pred.spec):
        try:
            candidate = predict(spec, pred.cluster)
        except PlanError:
            continue
        if candidate.memory.total <= limit:
            fits.append((candidate.tokens_per_s, override, candidate))
    if not fits:
        return None
    _, override, candidate = max(fits, key=lambda item: item[0])
    return override, candidate


def memory_problem(cfg, gpu: str, gpus: int, margin: float) -> Optional[str]:
    """Why the configured plan does not fit ``gpus`` x ``gpu``, or None when it does."""
    cluster = load_cluster({"gpu": gpu, "gpus": gpus})
    pred = predict(from_config(cfg, {}), cluster)
    device = cluster.gpu.memory_gib * GIB
    limit = device * (1 + margin)
    if pred.memory.total <= limit:
        return None
    terms = pred.memory.gib()
    largest = max((k for k in terms if k != "total"), key=lambda k: terms[k])
    message = (f"the plan needs {pred.memory.total / GIB:.1f} GiB per GPU ({pred.memory.stage} pipeline stage), more "
               f"than the {cluster.gpu.memory_gib:.0f} GiB of a {cluster.gpu.name} (planner.margin={margin:g}); the "
               f"largest term is {largest} ({terms[largest]:.1f} GiB)")
    fix = cheapest_fit(pred, device)
    if fix is None:
        return message + ". No single change fits: add GPUs or run `python -m pretrain.plan --search`"
    override, candidate = fix
    return (message + f". The cheapest change that fits: {override} ({candidate.memory.total / GIB:.1f} GiB, "
            f"{candidate.tokens_per_s:,.0f} tokens/s predicted); `python -m pretrain.plan --search` ranks all plans")


def prelaunch(cfg, world_size: int, gpu: Optional[str] = None) -> None:
    """Run the check the config asks for (``planner.check``/``margin``/``gpu``); PlanError on refuse."""
    planner = cfg.planner
    if planner.check == "off":
        return
    gpu = gpu or planner.gpu or detect_gpu()
    if gpu is None:
        return
    try:
        problem = memory_problem(cfg, gpu, world_size, planner.margin)
    except ClusterError as err:  # an unknown GPU name: the user's to fix
        raise PlanError(f"planner.gpu={gpu}: {err}") from None
    except PlanError as err:  # a shape the planner does not model (e.g. an unknown vocabulary): not a refusal
        log.warning("planner: memory not checked before launch: %s", err)
        return
    if problem is None:
        return
    if planner.check == "refuse":
        raise PlanError(problem + "; or set planner.check=warn to start anyway")
    log.warning("%s", problem)
