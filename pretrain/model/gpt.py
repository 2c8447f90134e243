"""The decoder as a list of layer specs, and running it in one process.

``layer_specs`` describes the model once, as plain ``Layer`` records. With pp == 1 ``GPT`` runs the
layers in order inside one process; with pp > 1 ``pretrain.engine.pipeline`` hands the same list to
DeepSpeed's ``PipelineModule``, which builds only this stage's slice. Either way parameters get the
same canonical names, so init, checkpoints and export do not depend on the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional

import torch
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


@dataclass(frozen=True)
class Layer:
    """One layer of the model, not yet built: ``cls(*args)``.

    Layers with the same ``tied_key`` share one module: the first builds it, a later one calls
    ``forward_fn(module, x)`` on it instead. ``tied_weight_attr`` names the shared parameter (the
    pipeline all-reduces its gradient between the stages that hold a copy).
    """

    cls: type
    args: tuple = ()
    tied_key: Optional[str] = None
    forward_fn: Optional[Callable] = None
    tied_weight_attr: Optional[str] = None

    def build(self) -> nn.Module:
        return self.cls(*self.args)


def layer_specs(cfg: ModelConfig, mp: ModelParallelConfig) -> list[Layer]:
    vocab = padded_vocab_size(cfg)
    if cfg.tie_embeddings:
        specs = [Layer(WordEmbedding, (cfg, mp, vocab), tied_key="embed", tied_weight_attr="word.weight")]
    else:
        specs = [Layer(WordEmbedding, (cfg, mp, vocab))]
    specs.append(Layer(EmbeddingOutput, (cfg, mp)))
    specs += [Layer(Block, (cfg, mp, i)) for i in range(cfg.num_layers)]
    specs.append(Layer(FinalNorm, (cfg, mp)))
    if cfg.tie_embeddings:
        specs.append(Layer(WordEmbedding, (cfg, mp, vocab), tied_key="embed", forward_fn=_tied_logits,
                           tied_weight_attr="word.weight"))
    else:
        specs.append(Layer(OutputLayer, (cfg, mp, vocab)))
    return specs


class GPT(nn.Module):
    """All layers in one process (pp == 1). forward(tokens [b, s], labels [b, s]) -> mean loss."""

    def __init__(self, specs: list[Layer]):
        super().__init__()
        self.layers = nn.ModuleList()
        self._calls = []
        tied: dict[str, nn.Module] = {}
        for spec in specs:
            if spec.tied_key is not None and spec.tied_key in tied:
                self._calls.append(partial(spec.forward_fn, tied[spec.tied_key]))
                continue
            module = spec.build()
            if spec.tied_key is not None:
                tied[spec.tied_key] = module
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


def build_model(cfg: ModelConfig, parallel: ParallelConfig) -> GPT:
    """The whole model in this process, pp == 1 (weights uninitialised; see init.apply_init).

    Called on every rank after the process groups exist. A pipeline is DeepSpeed's to build:
    ``pretrain.engine.pipeline.build_model`` takes any layout.
    """
    if parallel.pipeline != 1:
        raise ValueError(f"pretrain.model.gpt.build_model builds pp == 1 only (got pipeline={parallel.pipeline}); "
                         "use pretrain.engine.pipeline.build_model")
    return GPT(layer_specs(cfg, megatron_config(parallel)))


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
