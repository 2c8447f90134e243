"""The data pipeline: raw text -> cleaned, filtered, deduplicated, decontaminated, tokenized shards.

Public API (see validation.py, pipeline.py and loader.py):
    validate_data_config(data_cfg)                        # every rank, before process groups start
    prepared = prepare_data(data_cfg)                     # rank 0 first; a cache hit afterwards
    train, valid, test = build_datasets(prepared, data_cfg, seq_length, (n_train, n_valid, n_test), seed)
    per_source_valid = build_eval_datasets(prepared, data_cfg, seq_length, seed, split="valid")
"""

from pretrain.data.loader import build_datasets, build_eval_datasets
from pretrain.data.pipeline import PreparedData, prepare_data
from pretrain.data.sources import DataConfigError
from pretrain.data.validation import validate_data_config

__all__ = [
    "validate_data_config", "prepare_data", "build_datasets", "build_eval_datasets", "PreparedData", "DataConfigError",
]
