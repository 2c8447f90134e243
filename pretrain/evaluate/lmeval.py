"""lm-evaluation-harness, offline: our models as lm-eval models, and one call that runs its tasks.

- ``PretrainLM``: any ``TokenScorer`` (our ``GPT`` or a transformers model in memory) as lm-eval's
  ``TemplateLM``; lm-eval tokenizes and builds the requests, the scorer computes log-likelihoods.
  Generation tasks are refused: this model scores log-likelihoods only.
- ``hf_lm``: lm-eval's own transformers model (``HFLM``) on an exported folder or an in-memory model.
- ``run_tasks``: ``simple_evaluate`` over the shipped tasks (``tasks/``) and any folders of local task
  YAMLs the user names. Hugging Face Hub and dataset downloads are switched off first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pretrain.errors import UserError
from pretrain.evaluate.scorer import TokenScorer

TASK_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def go_offline() -> None:
    """No network: the environment for what is imported later, the libraries' flags for what already is."""
    os.environ.update(OFFLINE)
    import datasets
    import huggingface_hub.constants

    datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("lm-eval is not installed: pip install -c constraints.txt -e '.[eval]' "
                        "(or score the shipped tasks without it: --scorer pretrain)") from None
    from lm_eval.api.model import TemplateLM

    return TemplateLM


def pretrain_lm(scorer: TokenScorer):
    """A ``TokenScorer`` as an lm-eval model (an instance of a ``TemplateLM`` subclass)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class PretrainLM(_lm_eval()):
        @property
        def eot_token_id(self) -> int:
            return scorer.eot_id

        @property
        def max_length(self) -> int:
            return scorer.max_length

        def tok_encode(self, string: str, **kwargs) -> list[int]:
            return scorer.encode(string)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            out = []
            for _key, context, continuation in requests:
                result = scorer.loglikelihood_tokens(list(context), list(continuation))
                self.cache_hook.add_partial("loglikelihood", _key, result)
                out.append(result)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (text,) in (r.args for r in requests):
                windows = get_rolling_token_windows(token_list=scorer.encode(text), prefix_token=scorer.eot_id,
                                                    max_seq_len=scorer.max_length, context_len=1)
                out.append(sum(scorer.loglikelihood_tokens(list(c), list(t))[0]
                               for c, t in map(make_disjoint_window, windows)))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise UserError("this model scores log-likelihoods only, so generation tasks (generate_until) are not run "
                            "here: export it (python -m pretrain.interop.export) and pass --backend hf")

    return PretrainLM()


def hf_lm(pretrained, tokenizer=None, max_length: Optional[int] = None):
    """lm-eval's transformers model (batch 1, CPU unless CUDA is there) on a folder or an in-memory model."""
    _lm_eval()
    import torch
    from lm_eval.models.huggingface import HFLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return HFLM(pretrained=pretrained, tokenizer=tokenizer, batch_size=1, device=device, max_length=max_length)


def run_tasks(lm, tasks: list[str], num_fewshot: int = 0, limit: Optional[int] = None,
              include_paths: tuple = ()) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's ``simple_evaluate`` (no stderr bootstrap, no samples kept)."""
    _lm_eval()
    go_offline()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise UserError(f"--include-path {path}: not a folder of lm-eval task YAMLs")
    manager = TaskManager(include_path=[str(TASK_DIR), *map(str, include_paths)], include_defaults=False)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}: the shipped ones are {', '.join(manager.all_tasks)}; "
                        "name a folder of your own lm-eval task YAMLs with --include-path")
    out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                          log_samples=False, bootstrap_iters=0)
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {key.split(",")[0]: float(value) for key, value in metrics.items()
                         if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    return results
