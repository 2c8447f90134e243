"""The framework's own scorer of the shipped tasks: the metrics lm-eval computes, straight from a model.

A ``TokenScorer`` holds a causal LM as a function ``tokens [s] -> logits [s, vocab]`` (fp32) and a
tokenizer, and scores (context, continuation) pairs as lm-eval's causal models do: trailing spaces of
the context move to the continuation, the pair is encoded whole and the context's tokens split off,
an empty context is the end-of-text token, and a pair longer than the model's positions is cut from
the left. ``score_task`` builds each example's requests as lm-eval's task YAMLs do (few-shot examples
are the train split's first ones, ``first_n``) and gives the same metrics:

- pretrain_lastword: ``acc`` (every target token is the greedy one), ``perplexity`` (exp of minus the
  mean target log-likelihood);
- pretrain_cloze: ``acc`` (the choice with the highest summed log-likelihood), ``acc_norm`` (per
  character of the choice).

Needs neither lm-eval nor process groups; every caller runs it in one process (rank 0 in training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.evaluate import taskdata

# One sequence of token ids [s] -> logits [s, vocab], fp32.
LogitsFn = Callable[[torch.Tensor], torch.Tensor]
FEWSHOT_DELIMITER = "\n\n"
DELIMITERS = {"pretrain_lastword": "", "pretrain_cloze": " "}  # each YAML's target_delimiter


@dataclass
class TokenScorer:
    logits: LogitsFn
    encode: Callable[[str], list[int]]
    eot_id: int
    max_length: int

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.eot_id], self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        n = len(self.encode(context))
        return whole[:n], whole[n:]

    @torch.no_grad()
    def loglikelihood_tokens(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax)."""
        tokens = (context + continuation)[-(self.max_length + 1):][:-1]
        logits = self.logits(torch.tensor(tokens, dtype=torch.long))[-len(continuation):]  # [n, vocab]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(continuation, dtype=torch.long)
        greedy = bool((logprobs.argmax(dim=-1) == target).all())
        return float(logprobs.gather(-1, target[:, None]).sum()), greedy

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        return self.loglikelihood_tokens(*self.encode_pair(context, continuation))


def _answer(task: str, example: dict) -> str:
    return example["target"] if task == "pretrain_lastword" else example["choices"][example["label"]]


def contexts(task: str, num_fewshot: int, limit: Optional[int] = None) -> list[tuple[str, dict]]:
    """(prompt, example) of each test example, its few-shot examples first (lm-eval's plain-text form)."""
    data = taskdata.splits(task)
    if num_fewshot > len(data["train"]):
        raise ValueError(f"{task} has {len(data['train'])} few-shot examples; asked for {num_fewshot}")
    delimiter = DELIMITERS[task]
    shots = "".join(e["context"] + delimiter + _answer(task, e) + FEWSHOT_DELIMITER for e in data["train"][:num_fewshot])
    tests = data["test"] if limit is None else data["test"][:limit]
    return [(shots + e["context"], e) for e in tests]


def score_task(scorer: TokenScorer, task: str, num_fewshot: int = 0, limit: Optional[int] = None) -> dict:
    """{metric: value, "examples": n} of one shipped task."""
    rows = contexts(task, num_fewshot, limit)
    if task == "pretrain_lastword":
        results = [scorer.loglikelihood(prompt, e["target"]) for prompt, e in rows]
        mean_ll = sum(ll for ll, _ in results) / len(results)
        return {"acc": sum(g for _, g in results) / len(results), "perplexity": math.exp(-mean_ll), "examples": len(rows)}
    acc = acc_norm = 0.0
    for prompt, e in rows:
        lls = np.array([scorer.loglikelihood(prompt, " " + choice)[0] for choice in e["choices"]])
        lengths = np.array([float(len(choice)) for choice in e["choices"]])
        acc += float(np.argmax(lls) == e["label"])
        acc_norm += float(np.argmax(lls / lengths) == e["label"])
    return {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows), "examples": len(rows)}


def score_tasks(scorer: TokenScorer, tasks: list[str], num_fewshot: int = 0, limit: Optional[int] = None) -> dict:
    return {task: score_task(scorer, task, num_fewshot, limit) for task in tasks}


# ---- models ---------------------------------------------------------------------------------------


def pretrain_logits(model) -> LogitsFn:
    """Our ``GPT`` (tp = pp = 1): its logits are sequence-first, [s, b, vocab]."""
    return lambda tokens: model.logits(tokens[None].to(_device(model)))[:, 0].float().cpu()


def hf_logits(model) -> LogitsFn:
    """A transformers causal LM."""
    return lambda tokens: model(tokens[None].to(_device(model))).logits[0].float().cpu()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def text_encoder(tokenizer) -> Callable[[str], list[int]]:
    """A ``tokenizers.Tokenizer``'s encoding as lm-eval's transformers model asks for it."""
    return lambda text: tokenizer.encode(text).ids
