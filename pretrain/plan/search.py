"""``--search``: every parallel plan the trainer can run for a GPU count and global batch, ranked by
predicted tokens/s, and the best one written as a ``conf/parallel/<name>.yaml`` plan.

Searched: tp (dividing the heads, KV heads and FFN, within a node), cp (powers of two up to
``MAX_CONTEXT`` whose 2 cp chunks divide the sequence; none with attention dropout), pp (dividing the
layers), dp (the rest), ZeRO stage (2 and 3 only without pipelining: DeepSpeed's pipeline engine takes
ZeRO 0-1), SP (with tp > 1, and s/cp divisible by tp), recompute none or full, and the micro-batch
(dividing the per-replica batch). Fixed: the model, sequence length and global batch. Selective
recompute and virtual stages are modelled but not searched, because the trainer cannot run them yet
(``parallel.activation_checkpointing`` has no ``selective``, the pipeline engine no interleaving);
pass them with plan.* to predict one plan.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from pretrain.plan import Prediction, predict
from pretrain.plan.gpus import Cluster
from pretrain.plan.memory import GIB
from pretrain.plan.spec import PlanError, Spec

MAX_MICRO_BATCH = 64
# Llama 3 trained its 128K-token sequences with context parallel size 16 (REFERENCE.md).
MAX_CONTEXT = 16
# Device memory the search leaves free: the model's error on activations plus what it does not see
# (a larger first-step allocation, a checkpoint save's staging buffers).
MARGIN = 0.05
NAME = re.compile(r"[A-Za-z0-9_.+-]+")


def _divisors(n: int, limit: Optional[int] = None) -> list[int]:
    return [d for d in range(1, (limit or n) + 1) if n % d == 0]


def _contexts(spec: Spec, gpus: int) -> list[int]:
    """Context sizes to try on ``gpus`` GPUs: powers of two whose 2 cp chunks divide the sequence."""
    if spec.attention_dropout:  # ring attention has none
        return [1]
    out, cp = [1], 2
    while cp <= min(gpus, MAX_CONTEXT):
        if gpus % cp == 0 and spec.seq % (2 * cp) == 0:
            out.append(cp)
        cp *= 2
    return out


def candidates(spec: Spec, cluster: Cluster):
    """Every Spec the trainer can run on ``cluster.gpus`` GPUs with ``spec``'s model and batch."""
    n = cluster.gpus
    for tp in _divisors(n, cluster.gpus_per_node):
        if spec.heads % tp or spec.kv_heads % tp or spec.ffn % tp:
            continue
        for cp in _contexts(spec, n // tp):
            for pp in _divisors(n // (tp * cp)):
                if spec.layers % pp:
                    continue
                dp = n // (tp * pp * cp)
                if spec.global_batch % dp:
                    continue
                for micro in _divisors(spec.global_batch // dp, MAX_MICRO_BATCH):
                    for zero in (0, 1, 2, 3) if pp == 1 else (0, 1):
                        if zero and dp * cp == 1:
                            continue  # nothing to shard over
                        for sp in (False, True) if tp > 1 else (False,):
                            if sp and (spec.seq // cp) % tp:
                                continue
                            for recompute in ("none", "full"):
                                yield spec.with_(tp=tp, pp=pp, dp=dp, cp=cp, micro_batch=micro, zero=zero, sp=sp,
                                                 recompute=recompute, virtual_stages=1)


def search(spec: Spec, cluster: Cluster, margin: float = MARGIN) -> list[Prediction]:
    """Plans that fit in device memory less ``margin`` of it, fastest first (less memory first among equals)."""
    budget = (1 - margin) * cluster.gpu.memory_gib * GIB
    found, tried = [], 0
    for cand in candidates(spec, cluster):
        tried += 1
        try:
            pred = predict(cand, cluster)
        except PlanError:
            continue
        if pred.memory.total <= budget:
            found.append(pred)
    if not tried:
        raise PlanError(f"no parallel plan divides {cluster.gpus} GPUs for this model and batch: tensor must divide "
                        f"the {spec.heads} heads within a {cluster.gpus_per_node}-GPU node, pipeline the {spec.layers} "
                        f"layers, and data the global batch of {spec.global_batch}; pick a GPU count that does")
    found.sort(key=lambda p: (-round(p.tokens_per_s, 3), p.memory.total))
    return found


def plan_yaml(pred: Prediction, name: str) -> str:
    s = pred.spec
    return "\n".join([
        f"# Written by `python -m pretrain.plan --search` for {s.gpus} x {pred.cluster.gpu.name}, global batch",
        f"# {s.global_batch} x {s.seq} tokens. Use with trainer.micro_batch_size={s.micro_batch}. Predicted:",
        f"# {pred.memory.total / GIB:.1f} GiB per GPU, {pred.time.total:.2f} s per step, "
        f"{pred.tokens_per_s:,.0f} tokens/s, MFU {pred.mfu:.1%}.",
        "defaults:",
        "  - parallel_schema",
        "  - _self_",
        f"name: {name}",
        f"tensor: {s.tp}",
        f"pipeline: {s.pp}",
        f"data: {s.dp}",
        f"context: {s.cp}",
        f"zero_stage: {s.zero}",
        f"sequence_parallel: {'true' if s.sp else 'false'}",
        f"activation_checkpointing: {s.recompute}",
        "",
    ])


def write_plan(pred: Prediction, name: str, out: Optional[str] = None) -> Path:
    if not NAME.fullmatch(name):
        raise PlanError(f"--write {name!r}: a plan name is letters, digits and _ . + - (it names the YAML file)")
    path = Path(out) if out else Path(f"{name}.yaml")
    if path.is_dir() or (out and out.endswith("/")):
        path = path / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan_yaml(pred, name))
    return path
