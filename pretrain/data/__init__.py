"""The data pipeline: raw text -> cleaned, filtered, deduplicated, decontaminated, tokenized shards.

Public API (see pipeline.py and loader.py):
    prepared = prepare_data(data_cfg)                     # rank 0 first; a cache hit afterwards
    train, valid, test = build_datasets(prepared, data_cfg, seq_length, (n_train, n_valid, n_test), seed)
    per_source_valid = build_eval_datasets(prepared, data_cfg, seq_length, seed, split="valid")
"""

from pretrain.data.loader import build_datasets, build_eval_datasets
from pretrain.data.pipeline import PreparedData, prepare_data
from pretrain.data.sources import DataConfigError

__all__ = ["prepare_data", "build_datasets", "build_eval_datasets", "PreparedData", "DataConfigError"]
