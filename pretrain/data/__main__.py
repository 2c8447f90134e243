"""``python -m pretrain.data [overrides]`` (console script ``pretrain-data``).

Composes ``conf/prepare.yaml`` (default ``data: builtin``), prepares the shards (or finds them
cached) and prints the mixture report, e.g. ``python -m pretrain.data data=tiny`` or
``python -m pretrain.data data=gpt3_mix data.root=/data/gpt3 data.token_budget=300e9``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pretrain.config import CONF_DIR
from pretrain.errors import HydraEntry

# A bad config or bad input (any UserError: DataConfigError, CorpusNotInstalled), or overrides Hydra
# cannot compose, is `data: error: ...` on stderr and exit 2 (--debug / HYDRA_FULL_ERROR=1 re-raise).
entry = HydraEntry("data")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prepare")
@entry.task
def _main(cfg: DictConfig) -> None:
    from pretrain.data import prepare_data

    prepared = prepare_data(cfg.data)
    print(f"tokenizer: {prepared.tokenizer_file} (vocab {prepared.vocab_size}, end-of-text id {prepared.eod_id})")
    print(f"shards: {prepared.shard_dir} (mixture report: {prepared.shard_dir}/mixture_report.json)")


def main() -> None:
    from pretrain.config import register_configs

    register_configs()
    entry.run(_main)


if __name__ == "__main__":
    main()
