"""Building the model for any layout: ``GPT`` in one process, or DeepSpeed's ``PipelineModule`` (pp > 1).

The model describes itself as ``pretrain.model.gpt.Layer`` records; here they become DeepSpeed's
``LayerSpec`` / ``TiedLayerSpec``, so the pipeline builds only this stage's layers. Stages are cut
between blocks (``type:Block``), and the last stage computes the loss.
"""

from __future__ import annotations

from functools import partial

from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from pretrain.config import ModelConfig, ParallelConfig
from pretrain.engine.groups import topology
from pretrain.model import context, gpt
from pretrain.model.fused_loss import fused_lm_loss
from pretrain.model.layers import lm_loss


def deepspeed_spec(layer: gpt.Layer) -> LayerSpec:
    """DeepSpeed's spec for one of the model's layers."""
    if layer.tied_key is None:
        return LayerSpec(layer.cls, *layer.args)
    tied = {} if layer.tied_weight_attr is None else {"tied_weight_attr": layer.tied_weight_attr}
    return TiedLayerSpec(layer.tied_key, layer.cls, *layer.args, forward_fn=layer.forward_fn, **tied)


def _pipeline_loss(logits, labels):
    return lm_loss(logits, context.shard(labels, 1))


def _fused_pipeline_loss(chunk: int, sequence_parallel: bool, outputs, labels):
    hidden, weight = outputs  # the last stage's head emits both under model.fused_loss
    return fused_lm_loss(hidden, weight, context.shard(labels, 1), chunk, sequence_parallel)


def build_model(cfg: ModelConfig, parallel: ParallelConfig) -> nn.Module:
    """Build this rank's part of the model (weights uninitialised; see init.apply_init).

    Called on every rank after the process groups exist (``groups.init_distributed``).
    """
    if parallel.pipeline == 1:
        return gpt.build_model(cfg, parallel)
    mp = gpt.megatron_config(parallel)
    fused = partial(_fused_pipeline_loss, cfg.fused_loss_chunk, mp.sequence_parallel)
    return PipelineModule(
        layers=[deepspeed_spec(layer) for layer in gpt.pipeline_specs(cfg, mp)],
        topology=topology(parallel),
        loss_fn=fused if cfg.fused_loss else _pipeline_loss,
        partition_method="type:Block",
    )
