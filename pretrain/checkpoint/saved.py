"""Reading DeepSpeed's checkpoint files back into full tensors under canonical names, from any layout.

DeepSpeed's checkpoint files hold each rank's piece of the training state in that layout's terms:
TP slices, pipeline stages, ZeRO partitions of flat fp32 buffers. A checkpoint also records, for
every model-parallel rank, how its parameters map to canonical (layout-independent) names and TP
splits (``pretrain.engine.layout.describe``). From that, ``SavedCheckpoint`` rebuilds the full fp32
master weights and Adam moments of every parameter, from any layout (tp, pp, dp, cp, ZeRO 0-3, fp32 or
bf16), in one process without process groups. ``reshard`` and ``interop.export`` read through it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Optional

import torch

from pretrain.checkpoint import safeload
from pretrain.errors import CheckpointError
from pretrain.model.weights import gather

STATES = ("fp32", "exp_avg", "exp_avg_sq")


class ReshardError(CheckpointError):
    """The checkpoint cannot be read or does not fit the model; the message names the cause."""


def _load(path: Path) -> dict:
    return safeload.load(path, mmap=True)


def _group_step(saved_optimizer: dict, step: Optional[float]) -> Optional[float]:
    """Adam's step count: torch keeps it per parameter state, apex's FusedAdam per parameter group
    (``pretrain.engine.full_state._set_step`` writes it)."""
    groups = saved_optimizer.get("param_groups") or [{}]
    return float(groups[0]["step"]) if "step" in groups[0] else step


class SavedCheckpoint:
    """One checkpoint tag folder of any layout, read without process groups."""

    def __init__(self, tag_dir: Path):
        self.tag_dir = Path(tag_dir)
        self.ranks: dict[int, dict] = {}  # mp rank -> its model-states dict (weights mmapped)
        for f in sorted(self.tag_dir.glob("*mp_rank_*_model_states.pt")):
            if f.name.startswith("zero_pp_rank_") and not f.name.startswith("zero_pp_rank_0_"):
                continue  # ZeRO-3 writes one per DP rank; DP rank 0's carries the client state
            mp = int(re.search(r"mp_rank_(\d+)", f.name).group(1))
            self.ranks[mp] = _load(f)
        if not self.ranks:
            raise ReshardError(f"{self.tag_dir}: no DeepSpeed model-states file; is this a pretrain checkpoint?")
        first = self.ranks[min(self.ranks)]
        if "parameters" not in first or "layout" not in first:
            raise ReshardError(
                f"{self.tag_dir} does not record its parameter layout (written by an older pretrain); "
                "resume it at the layout it was saved with"
            )
        self.layout = {k: v for k, v in first["layout"].items() if k not in ("tp_rank", "pp_rank")}
        self.train_state = first.get("train_state", {})

    def _optim_files(self, mp: int) -> list[Path]:
        files = list(self.tag_dir.glob(f"*zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt"))
        files.sort(key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))
        # ZeRO partitions over data x context (pretrain.engine.groups); "context" is absent before CP existed.
        ranks = self.layout["data"] * self.layout.get("context", 1)
        if len(files) != ranks:
            raise ReshardError(f"{self.tag_dir}: {len(files)} optimizer partitions for model-parallel rank {mp}, "
                               f"expected {ranks} (one per data x context rank); the checkpoint is incomplete")
        return files

    def _rank_states(self, mp: int, keys: tuple[str, ...]) -> tuple[dict[str, dict[str, torch.Tensor]], Optional[float]]:
        """({module name: {state: TP-local tensor}}, Adam step) of one model-parallel rank."""
        sd = self.ranks[mp]
        table, stage = sd["parameters"], self.layout["zero_stage"]
        out = {name: {} for name in table}
        step = None
        if stage == 0 and self.layout["precision"] == "fp32":
            if "fp32" in keys:
                for name, w in self._module_weights(mp).items():
                    out[name]["fp32"] = w
            moments = [k for k in keys if k != "fp32"]
            if moments:
                saved = sd["optimizer"]
                for name, info in table.items():
                    g, i = info["optimizer"]
                    state = saved["state"].get(saved["param_groups"][g]["params"][i], {})
                    for k in moments:
                        if k in state:
                            out[name][k] = state[k]
                    if "step" in state:
                        step = float(state["step"])
                step = _group_step(saved, step)
        else:
            step = self._zero_states(mp, table, stage, keys, out)
        for name, states in out.items():
            shape = table[name]["shape"]
            for k, v in states.items():
                states[k] = v.reshape(shape).float()
            for k in keys:  # Adam creates its moments at a parameter's first update: zeros before
                if k != "fp32":
                    states.setdefault(k, torch.zeros(shape))
        return out, step

    def _module_weights(self, mp: int) -> dict[str, torch.Tensor]:
        """Module weights of an fp32 stage-0 rank: the model states, or the pipeline's layer files."""
        sd = self.ranks[mp]
        table = sd["parameters"]
        if sd.get("module") is not None:
            return {name: sd["module"][name] for name in table}
        files, weights = {}, {}
        for name, info in table.items():
            if info["layer_file"] is None:
                continue  # a tied weight's second use: its first use's layer file holds it
            file, key = info["layer_file"]
            if file not in files:
                files[file] = _load(self.tag_dir / file)
            weights[name] = files[file][key]
        return weights

    def _zero_states(self, mp, table, stage, keys, out) -> Optional[float]:
        parts = [_load(f)["optimizer_state_dict"] for f in self._optim_files(mp)]
        step = None
        if stage in (1, 2):
            # Each DP rank holds whole or partial parameters of each flat group; its
            # param_slice_mappings give every fragment's place, in the order of the ranks.
            for part in parts:
                base = part["base_optimizer_state"]["state"]
                for g, mapping in enumerate(part["param_slice_mappings"]):
                    flats = {"fp32": part["single_partition_of_fp32_groups"][g]}
                    flats.update({k: base[g][k] for k in keys if k != "fp32" and k in base.get(g, {})})
                    if "step" in base.get(g, {}):
                        step = float(base[g]["step"])
                    for name, address in mapping.items():
                        for k in keys:
                            if k in flats:
                                out[name].setdefault(k, []).append(flats[k].narrow(0, address.start, address.numel))
                step = _group_step(part["base_optimizer_state"], step)
        else:
            # ZeRO-3 partitions every parameter on its own: ceil(numel / dp) elements per rank, in
            # the order of param_shapes, the flat groups of a rank back to back.
            order = [name for group in self.ranks[mp]["param_shapes"] for name in group]
            flats = {}
            for k in keys:
                per_rank = []
                for part in parts:
                    if k == "fp32":
                        per_rank.append(torch.cat(list(part["fp32_flat_groups"])))
                    else:
                        state = part["optimizer_state_dict"]["state"]
                        per_rank.append(torch.cat([state[g][k] for g in sorted(state)]))
                        step = _group_step(part["optimizer_state_dict"], float(state[min(state)].get("step", 0)))
                flats[k] = per_rank
            dp, offset = len(parts), 0
            for name in order:
                numel = math.prod(table[name]["shape"])
                chunk = math.ceil(numel / dp)
                for k, per_rank in flats.items():
                    out[name][k] = torch.cat([r.narrow(0, offset, chunk) for r in per_rank])[:numel]
                offset += chunk
        for states in out.values():
            for k, v in list(states.items()):
                if isinstance(v, list):
                    states[k] = torch.cat(v)
        return step

    def full_states(self, keys: Iterable[str] = STATES) -> tuple[dict[str, dict[str, torch.Tensor]], Optional[float]]:
        """({canonical name: {state: full fp32 tensor}}, Adam step) over every TP rank and stage."""
        keys = tuple(keys)
        by_stage: dict[int, dict[int, tuple]] = {}
        step = None
        for mp, sd in self.ranks.items():
            states, rank_step = self._rank_states(mp, keys)
            step = rank_step if rank_step is not None else step
            by_stage.setdefault(sd["layout"]["pp_rank"], {})[sd["layout"]["tp_rank"]] = (sd["parameters"], states)
        full: dict[str, dict[str, torch.Tensor]] = {}
        for stage in sorted(by_stage):
            ranks = [by_stage[stage][r] for r in sorted(by_stage[stage])]
            table = ranks[0][0]
            for name, info in table.items():
                if info["canonical"] in full:  # a pipeline copy of a tied weight: the same values
                    continue
                merged = {}
                for k in keys:
                    shards = [states[name][k] for _, states in ranks if k in states[name]]
                    if not shards:
                        continue
                    if info["tp_dim"] is None:
                        merged[k] = shards[0]
                    else:
                        merged[k] = gather(shards, info["tp_dim"], info["stride"])
                    merged[k] = merged[k].contiguous()
                full[info["canonical"]] = merged
        missing = sorted(name for name, states in full.items() if set(states) != set(keys))
        if missing:
            raise ReshardError(f"{self.tag_dir}: no {'/'.join(keys)} state for {', '.join(missing[:5])}"
                               + (" ..." if len(missing) > 5 else ""))
        return full, step
