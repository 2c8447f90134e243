"""Resume a checkpoint at another parallel layout, optimizer state included.

    python -m pretrain.checkpoint.reshard CKPT_DIR [--tag stepXXXXXXXX]

DeepSpeed's checkpoint files hold each rank's piece of the training state in that layout's terms:
TP slices, pipeline stages, ZeRO partitions of flat fp32 buffers. A checkpoint also records, for
every model-parallel rank, how its parameters map to canonical (layout-independent) names and TP
splits (``describe``). From that, ``SavedCheckpoint`` rebuilds the full fp32 master weights and
Adam moments of every parameter under canonical names, from any layout (tp, pp, dp, ZeRO 0-3,
fp32 or bf16).

``convert`` writes them once into ``<tag>/universal/`` (safetensors, one file per state, plus
``meta.json`` with the Adam step and trainer state); ``load_universal`` then fills an engine of the
new layout, each rank reading only the slices it holds. ``checkpoint.resume`` does both when the
saved layout differs from the configured one. Loading into ZeRO follows DeepSpeed's own universal
checkpoint loader (fp32 fragments of each parameter, optimizer state linked to the flat partitions).

The conversion holds one full fp32 copy of the model (4 bytes per parameter) at a time in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from pretrain.checkpoint import manifest
from pretrain.checkpoint import safeload
from pretrain.errors import CheckpointError

STATES = ("fp32", "exp_avg", "exp_avg_sq")
UNIVERSAL = "universal"
META = "meta.json"
FORMAT = 1


class ReshardError(CheckpointError):
    """The checkpoint cannot be read or does not fit the model; the message names the cause."""


# ---------------------------------------------------------------------------------------------
# What a checkpoint records (at save time, per model-parallel rank)


def local_shape(p: nn.Parameter) -> list[int]:
    """This rank's (TP-local) shape of p, also under ZeRO-3 where p itself is partitioned away."""
    return list(getattr(p, "ds_shape", p.shape))


def describe(module: nn.Module, optimizer) -> dict:
    """{module parameter name: canonical name, TP-local shape, TP split, where its weight is saved} for this rank.

    ``optimizer`` positions are recorded when its groups hold the parameters themselves (no ZeRO,
    fp32): its saved state is indexed by them. Under a pipeline, weights are saved per layer (by
    ``PipelineModule.save_state_dict``): the file and key are recorded.
    """
    from pretrain.model.gpt import canonical_parameters

    canonical = {id(p): name for name, p in canonical_parameters(module)}
    position = {}
    for g, group in enumerate(getattr(optimizer, "param_groups", [])):
        for i, p in enumerate(group["params"]):
            position[id(p)] = [g, i]
    layer_file = {}
    if hasattr(module, "ckpt_layer_path"):
        for idx, layer in enumerate(module.forward_funcs):
            if isinstance(layer, nn.Module):
                file = Path(module.ckpt_layer_path("", idx)).name
                for key, p in layer.named_parameters():
                    layer_file.setdefault(id(p), [file, key])
    table = {}
    for name, p in module.named_parameters():
        if id(p) not in canonical:
            continue
        split = getattr(p, "tensor_model_parallel", False)
        table[name] = {
            "canonical": canonical[id(p)],
            "shape": local_shape(p),
            "tp_dim": p.partition_dim if split else None,
            "stride": getattr(p, "partition_stride", 1) if split else 1,
            "optimizer": position.get(id(p)),
            "layer_file": layer_file.get(id(p)),
        }
    return table


# ---------------------------------------------------------------------------------------------
# Reading DeepSpeed's files back into canonical full tensors


def _load(path: Path) -> dict:
    return safeload.load(path, mmap=True)


def gather_tp(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of ``init.shard``: rank r holds chunk r of each of ``stride`` stacked parts."""
    parts = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([torch.cat([p[j] for p in parts], dim=dim) for j in range(stride)], dim=dim)


def _group_step(saved_optimizer: dict, step: Optional[float]) -> Optional[float]:
    """Adam's step count: torch keeps it per parameter state, apex's FusedAdam per parameter group."""
    groups = saved_optimizer.get("param_groups") or [{}]
    return float(groups[0]["step"]) if "step" in groups[0] else step


def _set_step(optimizer, state: dict, like: torch.Tensor, step: float) -> None:
    """Write Adam's step count where ``optimizer`` keeps it (see ``_group_step``)."""
    if type(optimizer).__module__.startswith("apex"):
        for group in optimizer.param_groups:
            group["step"] = int(step)
    # torch: a CPU scalar, or on the parameter's device when fused or capturable
    group = optimizer.param_groups[0]
    device = like.device if group.get("fused") or group.get("capturable") else "cpu"
    state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)


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
        if len(files) != self.layout["data"]:
            raise ReshardError(f"{self.tag_dir}: {len(files)} optimizer partitions for model-parallel rank {mp}, "
                               f"expected {self.layout['data']} (one per data-parallel rank); the checkpoint is incomplete")
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
                        merged[k] = gather_tp(shards, info["tp_dim"], info["stride"])
                    merged[k] = merged[k].contiguous()
                full[info["canonical"]] = merged
        missing = sorted(name for name, states in full.items() if set(states) != set(keys))
        if missing:
            raise ReshardError(f"{self.tag_dir}: no {'/'.join(keys)} state for {', '.join(missing[:5])}"
                               + (" ..." if len(missing) > 5 else ""))
        return full, step


# ---------------------------------------------------------------------------------------------
# The universal folder


def universal_dir(tag_dir: Path) -> Path:
    return Path(tag_dir) / UNIVERSAL


def convert(tag_dir: Path) -> Path:
    """Write ``<tag>/universal/`` from a checkpoint of any layout (once; later calls reuse it if intact)."""
    out = universal_dir(tag_dir)
    if out.is_dir():
        why = _universal_problem(out)
        if why is None:
            return out
        print(f"warning: {out} is damaged ({why}); converting the checkpoint again", file=sys.stderr, flush=True)
        shutil.rmtree(out)
    with malformed(tag_dir):
        return _convert(tag_dir, out)


def _universal_problem(out: Path) -> Optional[str]:
    """Why a universal folder cannot be reused, or None (its files match the checksums in meta.json)."""
    try:
        files = json.loads((out / META).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {META} ({type(err).__name__}: {err})"
    found, expected = manifest.read_expected_files(out, files)
    return found or manifest.compare(expected, manifest.hashes(out, sorted(expected)))


@contextlib.contextmanager
def malformed(tag_dir: Path):
    """A checkpoint file that loads but is not laid out as pretrain writes it: a named error, not a traceback."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise ReshardError(
            f"{tag_dir}: its files are not laid out as a pretrain checkpoint ({type(err).__name__}: {err}); "
            "was it written by another tool or damaged before its manifest was written?"
        ) from None


def _convert(tag_dir: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    saved = SavedCheckpoint(tag_dir)
    staging = Path(tag_dir) / f".{UNIVERSAL}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    step = None
    for k in STATES:  # one state at a time: the model's size in memory, not three times it
        full, found = saved.full_states((k,))
        step = found if found is not None else step
        save_file({name: states[k] for name, states in full.items()}, str(staging / f"{k}.safetensors"))
        del full
    files = manifest.hashes(staging, sorted(p.name for p in staging.iterdir()))
    meta = {"format": FORMAT, "step": step, "layout": saved.layout, "train_state": saved.train_state, "files": files}
    (staging / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(staging, out)  # atomic: a universal folder is complete or absent
    return out


def ensure_universal(tag_dir: Path) -> Path:
    """``convert`` on rank 0 while the others wait; every rank raises if it failed. Collective."""
    problem = None
    if dist.get_rank() == 0:
        try:
            convert(tag_dir)
        except CheckpointError as err:  # a damaged or hostile file: its message names it
            problem = str(err)
        except (OSError, RuntimeError) as err:
            problem = f"{type(err).__name__}: {err}"
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise ReshardError(f"cannot reshard {tag_dir}: {box[0]}")
    return universal_dir(tag_dir)


def _tp_slice(handle, name: str, p: nn.Parameter) -> torch.Tensor:
    """This TP rank's slice of the full tensor ``name``, read without loading the rest."""
    if not getattr(p, "tensor_model_parallel", False):
        return handle.get_tensor(name)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    view = handle.get_slice(name)
    dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
    size = view.get_shape()[dim]
    part = size // stride
    chunk = part // tp
    pieces = []
    for j in range(stride):
        start = j * part + rank * chunk
        index = [slice(None)] * len(view.get_shape())
        index[dim] = slice(start, start + chunk)
        pieces.append(view[tuple(index)])
    return torch.cat(pieces, dim=dim)


def model_shapes(module: nn.Module) -> dict[str, list[int]]:
    """{canonical name: full shape} of the whole model, every TP shard and stage. Collective."""
    from pretrain.model.gpt import canonical_parameters
    from pretrain.model.init import full_shape

    local = {name: full_shape(p) for name, p in canonical_parameters(module)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {name: shape for part in gathered for name, shape in part.items()}


def check_fits(stored: dict[str, list[int]], model: dict[str, list[int]], source) -> None:
    """Refuse, naming them, parameters whose shapes or presence differ between checkpoint and model."""
    problems = []
    for name, want in model.items():
        if name not in stored:
            problems.append(f"{name} is not in the checkpoint")
        elif list(stored[name]) != list(want):
            problems.append(f"{name} has shape {list(stored[name])} in the checkpoint but {list(want)} in the model")
    problems += [f"{name} is in the checkpoint but not in the model" for name in sorted(set(stored) - set(model))]
    if problems:
        raise ReshardError(
            f"checkpoint {source} does not fit the configured model: " + "; ".join(problems[:6])
            + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "")
            + ". Resume with the model config the checkpoint was trained with"
        )


@torch.no_grad()
def load_universal(engine, source: Path) -> dict:
    """Fill the engine's weights, fp32 masters and Adam state from a universal folder; returns its meta.

    Every rank calls it after ``deepspeed.initialize``.
    """
    from safetensors import safe_open

    from pretrain.model.gpt import canonical_parameters

    source = Path(source)
    meta = json.loads((source / META).read_text())
    if meta.get("format") != FORMAT:
        raise ReshardError(f"{source}: universal format {meta.get('format')}, this version reads {FORMAT}")
    handles = {k: safe_open(str(source / f"{k}.safetensors"), framework="pt") for k in STATES}
    params = list(canonical_parameters(engine.module))
    stored = {name: handles["fp32"].get_slice(name).get_shape() for name in handles["fp32"].keys()}
    check_fits(stored, engine.shapes, source.parent)
    step = float(meta["step"] or 0.0)
    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", None)  # DeepSpeed's ZeRO / bf16 optimizers wrap torch's
    if base is None or engine.zero_stage == 0 and not engine.bf16:
        for name, p in params:
            values = {k: _tp_slice(handles[k], name, p).to(p.device) for k in STATES}
            p.copy_(values["fp32"].to(p.dtype))
            optimizer.state[p] = {"exp_avg": values["exp_avg"], "exp_avg_sq": values["exp_avg_sq"]}
            _set_step(optimizer, optimizer.state[p], p, step)
        return meta

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
        values = {k: _tp_slice(handles[k], name, p).to(engine.device) for k in STATES}
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
    return meta


def main(argv=None) -> None:
    from pretrain.errors import user_errors

    parser = argparse.ArgumentParser(prog="python -m pretrain.checkpoint.reshard", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run dir, its checkpoints dir, or a tag dir")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest intact one)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with user_errors("reshard", ["--debug"] if args.debug else []):
        ckpt_dir, tag = manifest.find(args.checkpoint, args.tag)
        out = convert(Path(ckpt_dir) / tag)
    meta = json.loads((out / META).read_text())
    print(f"wrote {out} (saved at {meta['layout']}, step {meta['train_state'].get('step')})")


if __name__ == "__main__":
    main()
