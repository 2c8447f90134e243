"""What a checkpoint records about the live engine's parameters, so another layout can read it back.

``describe`` maps each of this rank's parameters to its canonical (layout-independent) name, its
TP-local shape and split, and where DeepSpeed saves it; ``model_shapes`` gives the full shape of
every parameter of the whole model. ``pretrain.checkpoint.saved`` reads checkpoints through them.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from pretrain.model.gpt import canonical_parameters
from pretrain.model.weights import gathered_full_shapes


def local_shape(p: nn.Parameter) -> list[int]:
    """This rank's (TP-local) shape of p, also under ZeRO-3 where p itself is partitioned away."""
    return list(getattr(p, "ds_shape", p.shape))


def describe(module: nn.Module, optimizer) -> dict:
    """{module parameter name: canonical name, TP-local shape, TP split, where its weight is saved} for this rank.

    ``optimizer`` positions are recorded when its groups hold the parameters themselves (no ZeRO,
    fp32): its saved state is indexed by them. Under a pipeline, weights are saved per layer (by
    ``PipelineModule.save_state_dict``): the file and key are recorded.
    """
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


def model_shapes(module: nn.Module) -> dict[str, list[int]]:
    """{canonical name: full shape} of the whole model, every TP shard and stage. Collective."""
    return gathered_full_shapes(canonical_parameters(module))
