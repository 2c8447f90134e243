"""Regional compilation: ``torch.compile`` of each transformer block, the rest left eager.

Compiling block by block (as torchtitan does) keeps compile time to one graph per distinct block,
whatever the depth, and leaves what is not a block alone: the DeepSpeed engine, the pipeline schedule,
the embedding and the vocab-parallel loss. The megatron-core tensor-parallel linears inside a block
are traced with it; where dynamo cannot trace something it breaks the graph and runs that piece
eagerly, and the first forward logs every break with its reason (at DEBUG; a one-line count at INFO).

``model.compile``: true, false, or null (the default): on when the model runs on CUDA, off on CPU,
where inductor's C++ compile of the first steps would outlast the built-in demo.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import Optional

import torch
from megatron.core import tensor_parallel
from torch import nn

from pretrain.model.layers import Block

log = logging.getLogger(__name__)


def wanted(setting: Optional[bool]) -> bool:
    """Whether ``model.compile`` compiles on this machine (null: only with CUDA)."""
    return torch.cuda.is_available() if setting is None else bool(setting)


def compile_blocks(model: nn.Module, setting: Optional[bool]) -> int:
    """Compile every ``Block`` of ``model`` in place (``nn.Module.compile``); the number compiled."""
    if not wanted(setting):
        return 0
    import torch._dynamo
    import torch._inductor.config

    # megatron-core's linears warn once (CUDA_DEVICE_MAX_CONNECTIONS) from inside the traced forward:
    # let dynamo move the call after the graph instead of breaking the graph at every linear.
    torch._dynamo.config.reorderable_logging_functions.add(warnings.warn)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if any(block.cfg.hidden_dropout or block.cfg.attention_dropout for block in blocks):
        # Dropout from the eager generators: the masks, and so the run, are the eager model's, and
        # the seeds megatron-core's RNG tracker keeps per TP rank still apply.
        torch._inductor.config.fallback_random = True
    for block in blocks:
        for module in block.modules():
            if isinstance(module, tensor_parallel.RowParallelLinear):
                _name_the_group(module)
        block.compile(dynamic=False)
    if blocks:
        _report_graph_breaks_after_first_forward(model, len(blocks))
    return len(blocks)


def _name_the_group(linear) -> None:
    """megatron-core's RowParallelLinear calls its matmul with ``tp_group=None``, which warns (a graph
    break) and then resolves the default TP group; give it that group itself. Row-parallel matmuls
    communicate nothing inside (the all-reduce follows), so the numbers are the same."""
    forward_impl, group = linear._forward_impl, linear.tp_group

    def with_group(*args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = group
        return forward_impl(*args, **kwargs)

    linear._forward_impl = with_group


def graph_breaks() -> Counter:
    """Dynamo's graph-break reasons so far in this process, with their counts."""
    from torch._dynamo.utils import counters

    return Counter(dict(counters["graph_break"]))


def _report_graph_breaks_after_first_forward(model: nn.Module, count: int) -> None:
    before = graph_breaks()

    def report(module, args, output):
        handle.remove()
        new = graph_breaks() - before
        log.info("model.compile: %d blocks compiled; %d graph breaks in the first forward%s", count,
                 sum(new.values()), " (reasons at DEBUG, logger pretrain.model.compile)" if new else "")
        for reason, times in new.most_common():
            log.debug("graph break (%d x): %s", times, reason)

    handle = model.register_forward_hook(report)  # on the eager top module, never traced
