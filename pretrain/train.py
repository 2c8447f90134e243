"""``python -m pretrain.train [overrides]`` (console script ``pretrain-train``): compose, validate, train."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pretrain.config import CONF_DIR, register_configs
from pretrain.reshard import ReshardError
from pretrain.trainer import Trainer
from pretrain.validate import ConfigError

log = logging.getLogger("pretrain")

register_configs()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    try:
        Trainer(cfg, HydraConfig.get().runtime.output_dir).run()
    except (ConfigError, ReshardError) as err:
        log.error("%s", err)
        sys.exit(2)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
