"""Synthetic documents for the data tests (imported by conftest and tests)."""

from __future__ import annotations

import json
import random

WORDS = (
    "river stone garden window letter morning silver quiet harbor lantern meadow winter candle "
    "orchard village bridge forest thunder summer violet engine copper marble shadow feather "
    "compass island kettle ladder mirror needle pocket ribbon saddle timber velvet wagon"
).split()


def make_doc(i: int, rng: random.Random, sentences: int = 8) -> str:
    """A unique, C4-clean document: >= 5 sentences of >= 3 words, ending in periods."""
    out = [f"Record {i} opens the account of item{i}."]
    for _ in range(sentences - 1):
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + ".")
    return " ".join(out)


def write_jsonl(path, texts, field="text"):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")
    return path


def synth_cfg(synth_dir, cache_dir, **over):
    """A data config over the three sources of the synth_dir fixture; `over` replaces top-level keys."""
    cfg = {
        "name": "synth",
        "cache_dir": str(cache_dir),
        "sources": [
            {"name": "a", "path": str(synth_dir / "a.jsonl"), "weight": 0.5, "curated": True},
            {"name": "b", "path": str(synth_dir / "b.jsonl"), "weight": 0.3, "curated": True},
            {"name": "c", "path": str(synth_dir / "c.jsonl"), "weight": 0.2, "curated": True},
        ],
        "tokenizer": {"kind": "bpe", "vocab_size": 512},
        "split": "80,10,10",
        "num_workers": 2,
        "progress": False,
    }
    cfg.update(over)
    return cfg
