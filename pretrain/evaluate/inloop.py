"""Task evaluation during training (``trainer.eval_tasks``), at any layout.

Every rank hands its parameters to ``gather_canonical`` (TP shards are all-gathered within the TP
group, ZeRO-3 partitions within the DP group; each pipeline stage's TP/DP rank 0 sends its stage to
global rank 0). Rank 0 then builds a transformers model from the full tensors
(``models.hf_model``: one process, no process groups, the same model whatever the layout) and scores
the shipped tasks with ``scorer``; nothing is broadcast back. Rank 0 alone holds the full fp32
weights meanwhile, plus the transformers model: the same memory again.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from pretrain.evaluate import taskdata
from pretrain.evaluate.scorer import score_tasks


def check_model(model_cfg) -> None:
    """Refuse (ConfigError) a model transformers cannot represent: rank 0 scores a transformers copy."""
    from pretrain.interop.export import ExportError, _family
    from pretrain.validate import ConfigError

    try:
        _family(model_cfg)
    except ExportError as err:
        raise ConfigError([f"trainer.eval_tasks scores a transformers copy of the model, and {err}; set "
                           "trainer.eval_tasks=[] and evaluate after training (python -m pretrain.evaluate)"]) from None


def _full_zero3(p: torch.Tensor) -> torch.Tensor:
    """p's values, gathering a ZeRO-3 partition within the DP group first (collective over it)."""
    if not hasattr(p, "ds_id"):
        return p.detach()
    p.all_gather()
    try:
        return p.detach().clone()
    finally:
        p.partition()


@torch.no_grad()
def gather_canonical(module) -> Optional[dict[str, torch.Tensor]]:
    """{canonical name: full fp32 CPU tensor} of the whole model on global rank 0, None on the others.

    Collective: every rank calls it with its part of the model (``engine.module``)."""
    from megatron.core import parallel_state as ps

    from pretrain.model.gpt import canonical_parameters
    from pretrain.model.weights import gather, is_split

    tp, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    mine = {}
    for name, p in canonical_parameters(module):
        value = _full_zero3(p).float()
        if is_split(p) and tp > 1:
            shards = [torch.empty_like(value) for _ in range(tp)]
            dist.all_gather(shards, value.contiguous(), group=group)
            value = gather(shards, p.partition_dim, getattr(p, "partition_stride", 1))
        mine[name] = value.cpu()
    sends = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine if sends else None, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    return {name: t for part in parts if part for name, t in part.items()}


class TaskEvaluator:
    """Scores ``trainer.eval_tasks`` on rank 0 every ``interval`` steps; {} on other steps and ranks."""

    def __init__(self, cfg, model_cfg, interval: int):
        if cfg.trainer.eval_tasks:
            check_model(model_cfg)
        self.tasks = list(cfg.trainer.eval_tasks)
        self.limit, self.fewshot = cfg.trainer.eval_tasks_limit, cfg.trainer.eval_tasks_fewshot
        self.model_cfg, self.interval = model_cfg, interval
        self.tokenizer = None
        if dist.get_rank() == 0 and self.tasks:
            from rich.console import Console
            from tokenizers import Tokenizer

            from pretrain.data import prepare_data

            prepared = prepare_data(cfg.data, console=Console(stderr=True, quiet=True))  # the run's own: a cache hit
            self.tokenizer = Tokenizer.from_file(prepared.tokenizer_file)
            for task in self.tasks:
                taskdata.splits(task)  # the examples now, not at the first evaluation

    def due(self, step: int) -> bool:
        return bool(self.tasks and self.interval and step % self.interval == 0)

    def evaluate(self, module, step: int) -> dict:
        """{"eval/<task>/<metric>": value} on rank 0 at due steps. Collective at due steps."""
        if not self.due(step):
            return {}
        canonical = gather_canonical(module)
        if canonical is None:
            return {}
        from pretrain.evaluate.models import EOD_TOKEN, hf_model, scorer_for

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        model = hf_model(self.model_cfg, canonical, self.tokenizer.token_to_id(EOD_TOKEN)).to(device)
        scorer = scorer_for(model, self.tokenizer, self.model_cfg.max_position_embeddings, hf=True)
        results = score_tasks(scorer, self.tasks, self.fewshot, self.limit)
        return {f"eval/{task}/{metric}": value for task, metrics in results.items() for metric, value in metrics.items() if metric != "examples"}
