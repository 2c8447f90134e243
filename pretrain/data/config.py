"""Schema of the ``data`` config section (conf/data/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class SourceConfig:
    name: str = MISSING
    # A built-in corpus name (see pretrain.data.corpus) or a path to text/JSONL/Parquet files.
    path: str = MISSING
    format: str = "auto"  # auto | text | jsonl | parquet | builtin
    text_field: str = "text"
    weight: Optional[float] = None
    epochs: Optional[float] = None
    curated: bool = False


@dataclass
class DataConfig:
    name: str = MISSING
    sources: list = field(default_factory=list)  # list[SourceConfig]
    # Where prepared stages are cached (content-addressed).
    cache_dir: str = "${oc.env:PRETRAIN_CACHE,${oc.env:HOME}/.cache/pretrain}"
    tokenizer: Any = field(default_factory=lambda: {"kind": "bpe", "vocab_size": 8192})
    stages: Any = field(default_factory=dict)
    split: str = "949,50,1"
    eval_files: list = field(default_factory=list)
    max_epochs_warning: float = 3.0
    token_budget: Optional[int] = None
