"""Filling an engine of any layout with full (canonical, layout-free) weights and Adam state.

``pretrain.checkpoint.reshard`` opens a checkpoint's universal folder and passes a reader; this
module puts each tensor where this layout's optimizer keeps it. Loading into ZeRO follows
DeepSpeed's own universal checkpoint loader (fp32 fragments of each parameter, optimizer state
linked to the flat partitions).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pretrain.checkpoint.saved import STATES
from pretrain.model.gpt import canonical_parameters

# read(state, canonical name, parameter) -> this TP rank's slice of that state of that parameter
Reader = Callable[[str, str, nn.Parameter], torch.Tensor]


def _set_step(optimizer, state: dict, like: torch.Tensor, step: float) -> None:
    """Write Adam's step count where ``optimizer`` keeps it: torch per parameter state, apex's
    FusedAdam per parameter group (``pretrain.checkpoint.saved._group_step`` reads it back)."""
    if type(optimizer).__module__.startswith("apex"):
        for group in optimizer.param_groups:
            group["step"] = int(step)
    # torch: a CPU scalar, or on the parameter's device when fused or capturable
    group = optimizer.param_groups[0]
    device = like.device if group.get("fused") or group.get("capturable") else "cpu"
    state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)


@torch.no_grad()
def load_full_state(engine, read: Reader, step: float) -> None:
    """Set every parameter of ``engine`` (a TrainEngine), its fp32 master and Adam moments from ``read``,
    and Adam's step to ``step``. Every rank calls it after ``deepspeed.initialize``."""
    params = list(canonical_parameters(engine.module))
    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", None)  # DeepSpeed's ZeRO / bf16 optimizers wrap torch's
    if base is None or engine.zero_stage == 0 and not engine.bf16:
        for name, p in params:
            values = {k: read(k, name, p).to(p.device) for k in STATES}
            p.copy_(values["fp32"].to(p.dtype))
            optimizer.state[p] = {"exp_avg": values["exp_avg"], "exp_avg_sq": values["exp_avg_sq"]}
            _set_step(optimizer, optimizer.state[p], p, step)
        return

    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    # Adam's state on the flat fp32 partitions exists only after a first step; create it (as
    # DeepSpeed's universal loader does) so each parameter's fragments can be written into it.
    if engine.zero_stage == 3:  # ZeRO-3 puts its flat partitions into the groups only during step()
        flats = list(optimizer.fp32_partitioned_groups_flat)
    else:
        flats = [flat for group in base.param_groups for flat in group["params"]]
    for flat in flats:
        state = base.state[flat]
        for k in ("exp_avg", "exp_avg_sq"):
            state.setdefault(k, torch.zeros_like(flat))
        _set_step(base, state, flat, step)
    for _, p in params:
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            flat = base.param_groups[mapping.param_group_index]["params"][0]
            mapping.set_optim_state_fragment(flat, base.state[flat])
    for name, p in params:
        values = {k: read(k, name, p).to(engine.device) for k in STATES}
        safe_set_full_fp32_param(p, values["fp32"])
        for k in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, values[k], k)
        if not hasattr(p, "ds_id"):
            p.copy_(values["fp32"].to(p.dtype))
    if engine.zero_stage == 3:
        # The module's partitions follow the fp32 ones (DeepSpeed's ZeRO-3 universal load does the same).
        for i, fp32 in enumerate(optimizer.fp32_partitioned_groups_flat):
            optimizer.fp16_partitioned_groups_flat[i].copy_(fp32)
            for partitioned, q in zip(optimizer.fp16_partitioned_groups[i],
                                      optimizer.unflatten(optimizer.fp16_partitioned_groups_flat[i],
                                                          optimizer.fp16_partitioned_groups[i])):
                partitioned.data = q.data
