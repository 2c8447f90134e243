"""``python -m pretrain.train [overrides]`` (console script ``pretrain-train``): compose, validate, train.

The config is validated on every rank before anything heavy is imported or any process group
starts; a bad one (or bad data settings, or an unusable checkpoint) exits with code 2 and a message
naming the key, file or line (``pretrain.errors``).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import sys

from pretrain.config import CONF_DIR, RENAMED, register_configs
from pretrain.errors import EXIT_USER_ERROR, HydraEntry

register_configs()
entry = HydraEntry("train")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@entry.task
def _main(cfg: DictConfig) -> None:
    from pretrain.environment import world_size_from_env
    from pretrain.validate import validate

    validate(cfg, world_size_from_env())
    if cfg.data.name != "synthetic":
        from pretrain.data import validate_data_config

        validate_data_config(cfg.data)
    from pretrain.engine import compat
    from pretrain.console import quiet_third_party

    quiet_third_party(cfg.logging.verbose)
    compat.select_cpu_accelerator()
    from pretrain.train.trainer import Trainer  # megatron-core and DeepSpeed: seconds to import

    quiet_third_party(cfg.logging.verbose)  # again: DeepSpeed's logger came with its own handler
    from pretrain.config import typed

    Trainer(typed(cfg), HydraConfig.get().runtime.output_dir).run()


def renamed_keys(argv: list[str]) -> list[str]:
    """A message for each override that names a key which has moved (``config.RENAMED``)."""
    problems = []
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in RENAMED:
            problems.append(f"{key} was renamed {RENAMED[key]}: use {RENAMED[key]}=" + arg.split("=", 1)[-1])
    return problems


def main() -> None:
    problems = renamed_keys(sys.argv[1:])
    if problems:
        for problem in problems:
            print(f"train: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    entry.run(_main)


if __name__ == "__main__":
    main()
