"""Text generation from a pretrain checkpoint or a transformers folder, with a KV cache.

    python -m pretrain.interop.generate CKPT_OR_HF_DIR --prompt "Once upon" [--max-new-tokens 50]
        [--temperature 0 (greedy) | 0.8] [--top-k 40] [--top-p 0.95] [--seed 0] [--no-cache]

The model runs in this one process (tp = pp = 1) whatever layout trained it: the checkpoint is
consolidated (pretrain.interop.export) or converted from transformers (pretrain.interop.import_hf) into canonical
full tensors first. Sampling is seeded, so the same command prints the same text.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pretrain.errors import CheckpointError, UserError, user_errors


class KVCache:
    """Keys and values of the tokens already processed, per block. ``length`` is the number of
    those tokens; the caller advances it after each forward."""

    def __init__(self):
        self.length = 0
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (b, kv heads, s, d) of the new tokens -> those of all tokens so far."""
        if layer in self._kv:
            k = torch.cat([self._kv[layer][0], k], dim=2)
            v = torch.cat([self._kv[layer][1], v], dim=2)
        self._kv[layer] = (k, v)
        return k, v


def apply_kv_cache(model: nn.Module, cache: Optional[KVCache]) -> None:
    """Route the model's attention (and position lookups) through ``cache``; None turns it off."""
    from pretrain.model.layers import Attention, EmbeddingOutput

    for module in model.modules():
        if isinstance(module, (Attention, EmbeddingOutput)):
            module.kv_cache = cache


def init_single_process() -> None:
    """A one-process group with tp = pp = 1 (idempotent)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain.engine import groups as distributed
    from pretrain.config import ParallelConfig

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return
    distributed.init_distributed(ParallelConfig())


def build_inference_model(model_cfg, canonical: dict[str, torch.Tensor], source="(in memory)") -> nn.Module:
    """A tp = pp = 1 ``GPT`` in eval mode holding the given full tensors (checked name by name and
    shape by shape; ``source`` names where they came from in the error)."""
    from pretrain.config import ParallelConfig
    from pretrain.model.gpt import build_model, canonical_parameters
    from pretrain.model.weights import check_fits, full_shape

    init_single_process()
    model = build_model(model_cfg, ParallelConfig())
    params = dict(canonical_parameters(model))
    check_fits({name: t.shape for name, t in canonical.items()}, {name: full_shape(p) for name, p in params.items()},
               source, CheckpointError, "Its saved model config (config.yaml, or config.json of a transformers "
               "folder) does not describe its weights: was it edited?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(canonical[name])
    return model.eval()


def load(path: str):
    """(model config, model, tokenizer or None) from a pretrain checkpoint or a transformers folder."""
    from pretrain.interop import export
    from pretrain.interop import import_hf

    p = Path(path)
    if (p / "config.json").is_file():
        model_cfg, canonical = import_hf.from_hf(p)
        tok_file = p / "tokenizer.json"
        tok = str(tok_file) if tok_file.is_file() else None
    else:
        cfg, ckpt_dir, tag = export.locate(path)
        model_cfg, canonical = cfg.model, export.consolidate(ckpt_dir, tag)
        tok = export.tokenizer_file(cfg)
    tokenizer = None
    if tok is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(tok)
    return model_cfg, build_inference_model(model_cfg, canonical, path), tokenizer


def next_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [b, s] -> logits of the last position [b, vocab] (fp32)."""
    return model.logits(tokens)[-1].float()  # logits are sequence-first: [s, b, vocab]


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """logits [b, vocab] -> next token ids [b]. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
    top_p: float = 1.0, seed: int = 0, use_cache: bool = True, eos_id: Optional[int] = None,
    max_positions: Optional[int] = None, vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Continue prompt ids [b, s] by up to max_new_tokens; returns [b, s + new].

    ``vocab_size`` masks the embedding's padding rows, so they are never sampled.
    """
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache() if use_cache else None
    apply_kv_cache(model, cache)
    try:
        out = tokens
        step_input = tokens
        for _ in range(max_new_tokens):
            if max_positions is not None and out.shape[1] >= max_positions:
                break
            logits = next_logits(model, step_input if use_cache else out)
            if vocab_size is not None:
                logits[:, vocab_size:] = float("-inf")
            nxt = sample(logits, temperature, top_k, top_p, generator)
            if cache is not None:
                cache.length += step_input.shape[1]
            out = torch.cat([out, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
        return out
    finally:
        apply_kv_cache(model, None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.interop.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="pretrain run/checkpoint dir or transformers folder")
    parser.add_argument("--prompt", default="", help="text (needs a tokenizer)")
    parser.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of text")
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    with user_errors("generate", debug=args.debug):
        _run(args)


def _check_sampling(args) -> None:
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.temperature < 0:
        problems.append(f"--temperature {args.temperature} must be >= 0 (0: greedy)")
    if args.top_k < 0:
        problems.append(f"--top-k {args.top_k} must be >= 0 (0: off)")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p {args.top_p} must be in (0, 1]")
    if problems:
        raise UserError("; ".join(problems))


def prompt_ids(text: str, vocab_size: int) -> list[int]:
    """Token ids from ``--prompt-ids`` ("1,2,3"), each checked against the model's vocabulary."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--prompt-ids {text!r}: expected comma-separated integers, e.g. --prompt-ids 1,2,3") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"--prompt-ids: {bad[:5]} outside the model's vocabulary [0, {vocab_size}) (model.vocab_size)")
    return ids


@torch.no_grad()  # a scope, not set_grad_enabled(False): main() also runs inside other programs (and tests)
def _run(args) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports DeepSpeed: its warning goes to stdout
    _check_sampling(args)
    model_cfg, model, tokenizer = load(args.model)
    if args.prompt_ids is not None:
        ids = prompt_ids(args.prompt_ids, model_cfg.vocab_size)
    elif tokenizer is not None:
        ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    else:
        raise UserError("this model has no tokenizer (synthetic data); pass --prompt-ids 1,2,3")
    if not ids:
        raise UserError("empty prompt: pass --prompt TEXT or --prompt-ids 1,2,3")
    eos = tokenizer.token_to_id("<|endoftext|>") if tokenizer is not None else None
    out = generate(
        model, torch.tensor([ids]), args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
        use_cache=not args.no_cache, eos_id=eos, max_positions=model_cfg.max_position_embeddings,
        vocab_size=model_cfg.vocab_size,
    )[0].tolist()
    print(tokenizer.decode(out) if tokenizer is not None else ",".join(map(str, out)))


if __name__ == "__main__":
    main()
