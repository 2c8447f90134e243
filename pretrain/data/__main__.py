"""``python -m pretrain.data [overrides]`` (console script ``pretrain-data``).

Composes ``conf/prepare.yaml`` (default ``data: builtin``), prepares the shards (or finds them
cached) and prints the mixture report, e.g. ``python -m pretrain.data data=tiny`` or
``python -m pretrain.data data=gpt3_mix data.root=/data/gpt3 data.token_budget=300e9``.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pretrain.config import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prepare")
def _main(cfg: DictConfig) -> None:
    from pretrain.data import DataConfigError, prepare_data

    try:
        prepared = prepare_data(cfg.data)
    except DataConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"tokenizer: {prepared.tokenizer_file} (vocab {prepared.vocab_size}, end-of-text id {prepared.eod_id})")
    print(f"shards: {prepared.shard_dir} (mixture report: {prepared.shard_dir}/mixture_report.json)")


def main() -> None:
    from pretrain.config import register_configs

    register_configs()
    _main()


if __name__ == "__main__":
    main()
