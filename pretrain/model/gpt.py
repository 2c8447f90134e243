"""The decoder as a list of pipeline layers, and the two ways to run it.

``layer_specs`` describes the model once. With pp == 1 ``GPT`` runs the layers in order inside one
process; with pp > 1 DeepSpeed's ``PipelineModule`` builds only this stage's slice of the same list.
Either way parameters get the same canonical names, so init, checkpoints and export do not depend
on the layout.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterator

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from pretrain.engine import compat
from pretrain.config import ModelConfig, ParallelConfig
from pretrain.model.layers import (
    Block,
    EmbeddingOutput,
    FinalNorm,
    OutputLayer,
    WordEmbedding,
    lm_loss,
)


def padded_vocab_size(cfg: ModelConfig) -> int:
    return cfg.vocab_multiple * math.ceil(cfg.vocab_size / cfg.vocab_multiple)


def megatron_config(parallel: ParallelConfig, params_dtype=torch.float32) -> ModelParallelConfig:
    """Only the TP settings: DeepSpeed owns the pipeline."""
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel.tensor,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor > 1,
        use_cpu_initialization=not compat.cuda_available(),
        # True so megatron-core tags TP-split weights (tensor_model_parallel, partition_dim); the
        # init_method it is given is a no-op and init.apply_init fills the weights.
        perform_initialization=True,
        params_dtype=params_dtype,
    )


def _tied_logits(embedding: WordEmbedding, x):
    return embedding.logits(x)


def layer_specs(cfg: ModelConfig, mp: ModelParallelConfig) -> list:
    vocab = padded_vocab_size(cfg)
    if cfg.tie_embeddings:
        specs = [TiedLayerSpec("embed", WordEmbedding, cfg, mp, vocab, tied_weight_attr="word.weight")]
    else:
        specs = [LayerSpec(WordEmbedding, cfg, mp, vocab)]
    specs.append(LayerSpec(EmbeddingOutput, cfg, mp))
    specs += [LayerSpec(Block, cfg, mp, i) for i in range(cfg.num_layers)]
    specs.append(LayerSpec(FinalNorm, cfg, mp))
    if cfg.tie_embeddings:
        specs.append(
            TiedLayerSpec("embed", WordEmbedding, cfg, mp, vocab, forward_fn=_tied_logits, tied_weight_attr="word.weight")
        )
    else:
        specs.append(LayerSpec(OutputLayer, cfg, mp, vocab))
    return specs


class GPT(nn.Module):
    """All layers in one process (pp == 1). forward(tokens [b, s], labels [b, s]) -> mean loss."""

    def __init__(self, specs: list):
        super().__init__()
        self.layers = nn.ModuleList()
        self._calls = []
        tied: dict[str, nn.Module] = {}
        for spec in specs:
            if isinstance(spec, TiedLayerSpec) and spec.key in tied:
                self._calls.append(partial(spec.forward_fn, tied[spec.key]))
                continue
            module = spec.build()
            if isinstance(spec, TiedLayerSpec):
                tied[spec.key] = module
            self.layers.append(module)
            self._calls.append(module)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> logits [s, b, vocab / tp]."""
        x = tokens
        for call in self._calls:
            x = call(x)
        return x

    def forward(self, tokens, labels):
        return lm_loss(self.logits(tokens), labels)


def _pipeline_loss(logits, labels):
    return lm_loss(logits, labels)


def build_model(cfg: ModelConfig, parallel: ParallelConfig, topology=None) -> nn.Module:
    """Build this rank's part of the model (weights uninitialised; see init.apply_init).

    Called on every rank after the process groups exist; ``topology`` is required when pp > 1.
    """
    specs = layer_specs(cfg, megatron_config(parallel))
    if parallel.pipeline == 1:
        return GPT(specs)
    return PipelineModule(
        layers=specs,
        topology=topology,
        loss_fn=_pipeline_loss,
        partition_method="type:Block",
    )


def canonical_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(layout-independent name, parameter) for every parameter this rank holds, each once."""
    for module in model.modules():
        name = getattr(module, "canonical_name", None)
        if name is None:
            continue
        for pname, p in module.named_parameters():
            yield f"{name}.{pname}", p


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int) -> None:
    """Recompute block activations in backward: 'full' for every block, 'every' for each k-th block."""
    for module in model.modules():
        if isinstance(module, Block):
            index = int(module.canonical_name.split(".")[1])
            module.activation_checkpoint = mode == "full" or (mode == "every" and index % every == 0)
