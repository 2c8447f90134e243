"""The models an evaluation scores, all in one process: our ``GPT`` from a run or a transformers folder
(``pretrain.interop.generate.load``), and a transformers model built in memory from canonical full
tensors (``pretrain.interop.export``'s mapping, no folder written), which needs no process groups."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pretrain.evaluate.scorer import TokenScorer, hf_logits, pretrain_logits, text_encoder

EOD_TOKEN = "<|endoftext|>"


@dataclass
class Loaded:
    """A model to evaluate: its config, our GPT, its tokenizer, and the run config (None for a folder)."""

    model_cfg: object
    model: torch.nn.Module
    tokenizer: object  # tokenizers.Tokenizer
    run_cfg: Optional[object]


def load(path: str) -> Loaded:
    """Our GPT (tp = pp = 1) from a run / checkpoint dir or a transformers folder, with its tokenizer."""
    from pretrain.errors import UserError
    from pretrain.interop import export, generate

    model_cfg, model, tokenizer = generate.load(path)
    if tokenizer is None:
        raise UserError(f"{path}: no tokenizer (a synthetic-data run): the tasks are text; train on text data")
    run_cfg = None if is_hf_folder(path) else export.locate(path)[0]
    return Loaded(model_cfg, model, tokenizer, run_cfg)


def is_hf_folder(path: str) -> bool:
    return (Path(path) / "config.json").is_file()


def scorer_for(model, tokenizer, max_length: int, hf: bool = False) -> TokenScorer:
    """The scorer of our GPT (``hf=False``) or of a transformers model."""
    eot = tokenizer.token_to_id(EOD_TOKEN)
    return TokenScorer(hf_logits(model) if hf else pretrain_logits(model), text_encoder(tokenizer),
                       0 if eot is None else eot, max_length)


def hf_model(model_cfg, canonical: dict[str, torch.Tensor], eos_id: Optional[int] = None):
    """A transformers GPT2LMHeadModel / LlamaForCausalLM (fp32, eval mode) holding canonical full tensors;
    refuses (ExportError, by name) the settings transformers cannot represent."""
    from transformers import AutoModelForCausalLM

    from pretrain.interop.export import hf_config, to_hf

    state = to_hf(model_cfg, canonical)
    config = hf_config(model_cfg, eos_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model_cfg.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"transformers model and export mapping disagree: missing {missing}, unexpected {unexpected}")
    return model.eval()


def hf_tokenizer(tokenizer):
    """A ``tokenizers.Tokenizer`` as transformers' fast tokenizer, as export writes it (lm-eval's HFLM wants one)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOD_TOKEN, eos_token=EOD_TOKEN,
                                   unk_token=EOD_TOKEN)
