"""The decoder as a list of layer specs, and running it in one process.

``layer_specs`` describes the model once, as plain ``Layer`` records. With pp == 1 ``GPT`` runs the
layers in order inside one process; with pp > 1 ``pretrain.engine.pipeline`` hands the same list to
DeepSpeed's ``PipelineModule``, which builds only this stage's slice. Either way parameters get the
same canonical names, so init, checkpoints and export do not depend on the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Iterator, Optional

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from pretrain.engine import compat
from pretrain.config import ModelConfig, ParallelConfig
from pretrain.model import context
from pretrain.model.attention import segment_ids
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
    """The TP settings (and the context size, for the record): DeepSpeed owns the pipeline and ZeRO."""
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel.tensor,
        context_parallel_size=parallel.context,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor > 1,
        use_cpu_initialization=not compat.cuda_available(),
        # True so megatron-core tags TP-split weights (tensor_model_parallel, partition_dim); the
        # init_method it is given is a no-op and init.apply_init fills the weights.
        perform_initialization=True,
        params_dtype=params_dtype,
    )


def _tied_logits(embedding: WordEmbedding, x):
    return embedding.logits(x)


def _weight_view(weight: nn.Parameter) -> torch.Tensor:
    # Made inside the stage's forward: DeepSpeed's bf16 pipeline drops the gradient of a weight whose
    # first use is in the loss function, after the forward (measured: pp2 bf16 grad norm 20% low).
    return weight.view(weight.shape)


def _hidden_and_tied_weight(embedding: WordEmbedding, x):
    return x, _weight_view(embedding.word.weight)


class HiddenOutput(OutputLayer):
    """The untied head of a pipeline's last stage under ``model.fused_loss``: passes on the hidden states
    and its weight, which the pipeline's loss function applies chunk by chunk."""

    def forward(self, x):
        return x, _weight_view(self.linear.weight)


def pipeline_specs(cfg: ModelConfig, mp: ModelParallelConfig) -> list[Layer]:
    """``layer_specs`` for DeepSpeed's pipeline. With the fused loss the head emits (hidden states,
    output weight) and the pipeline's loss function computes logits and loss together from them."""
    specs = layer_specs(cfg, mp)
    if not cfg.fused_loss:
        return specs
    head = specs[-1]
    if head.tied_key is not None:
        return specs[:-1] + [replace(head, forward_fn=_hidden_and_tied_weight)]
    return specs[:-1] + [replace(head, cls=HiddenOutput)]


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
    """All layers in one process (pp == 1). forward(tokens [b, s], labels [b, s]) -> mean loss.

    ``document_eod``: the end-of-text token id when attention stays within packed documents.
    """

    def __init__(self, specs: list[Layer], document_eod: Optional[int] = None):
        super().__init__()
        self.document_eod = document_eod
        self.layers = nn.ModuleList()
        self._calls = []
        tied: dict[str, nn.Module] = {}
        for spec in specs:
            if spec.tied_key is not None and spec.tied_key in tied:
                module = tied[spec.tied_key]
                self._calls.append(partial(spec.forward_fn, module))
            else:
                module = spec.build()
                if spec.tied_key is not None:
                    tied[spec.tied_key] = module
                self.layers.append(module)
                self._calls.append(module)
            # The last layer is the output head (held by index: an attribute would register it twice).
            self._head_index = next(i for i, m in enumerate(self.layers) if m is module)

    def _run(self, tokens: torch.Tensor, calls: list) -> torch.Tensor:
        # Document ids count end-of-text tokens from the row's start: taken before the context shard.
        segments = None if self.document_eod is None else context.shard(segment_ids(tokens, self.document_eod), 1)
        x = tokens
        for call in calls:
            x = call(x, segments) if isinstance(call, Block) else call(x)
        return x

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> logits [s, b, vocab / tp]."""
        return self._run(tokens, self._calls)

    def forward(self, tokens, labels):
        """tokens, labels [b, s]: the mean loss over this rank's tokens (its context shard)."""
        head = self.layers[self._head_index]
        labels = context.shard(labels, 1)
        if head.fused_loss_chunk is None:
            return lm_loss(self.logits(tokens), labels)
        # The output layer and the loss in one pass, chunk by chunk.
        return head.loss(self._run(tokens, self._calls[:-1]), labels)


def build_model(cfg: ModelConfig, parallel: ParallelConfig) -> GPT:
    """The whole model in this process, pp == 1 (weights uninitialised; see init.apply_init).

    Called on every rank after the process groups exist. A pipeline is DeepSpeed's to build:
    ``pretrain.engine.pipeline.build_model`` takes any layout.
    """
    if parallel.pipeline != 1:
        raise ValueError(f"pretrain.model.gpt.build_model builds pp == 1 only (got pipeline={parallel.pipeline}); "
                         "use pretrain.engine.pipeline.build_model")
    return GPT(layer_specs(cfg, megatron_config(parallel)), cfg.eod_token_id if cfg.document_mask else None)


def canonical_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(layout-independent name, parameter) for every parameter this rank holds, each once."""
    for module in model.modules():
        name = getattr(module, "canonical_name", None)
        if name is None:
            continue
        for pname, p in module.named_parameters():
            yield f"{name}.{pname}", p


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int) -> None:
    """Recompute activations in backward: 'full' every block, 'every' each k-th block, 'selective' only
    the attention core of every block (softmax, dropout, attention over V; Korthikanti et al.)."""
    for module in model.modules():
        if isinstance(module, Block):
            index = int(module.canonical_name.split(".")[1])
            module.activation_checkpoint = mode == "full" or (mode == "every" and index % every == 0)
            module.attn.recompute_core = mode == "selective"
