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

from pretrain.config import CONF_DIR, check_renamed, register_configs
from pretrain.errors import HydraEntry, user_errors

register_configs()
entry = HydraEntry("train")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@entry.task
def _main(cfg: DictConfig) -> None:
    from pretrain.environment import serialize_device_connections, world_size_from_env
    from pretrain.validate import validate

    validate(cfg, world_size_from_env())
    serialize_device_connections(cfg.parallel.tensor)  # before the planner's check touches CUDA
    if cfg.data.name != "synthetic":
        from pretrain.data import validate_data_config

        validate_data_config(cfg.data)
    from pretrain.plan.check import prelaunch

    prelaunch(cfg, world_size_from_env())  # on a GPU: refuse a plan that cannot fit in its memory
    from pretrain.engine import compat
    from pretrain.console import quiet_third_party

    quiet_third_party(cfg.logging.verbose)
    compat.select_cpu_accelerator()
    from pretrain.train.trainer import Trainer  # megatron-core and DeepSpeed: seconds to import

    quiet_third_party(cfg.logging.verbose)  # again: DeepSpeed's logger came with its own handler
    from pretrain.config import typed

    Trainer(typed(cfg), HydraConfig.get().runtime.output_dir).run()


def main() -> None:
    with user_errors("train"):
        check_renamed(sys.argv[1:])  # before Hydra, whose message would not name the new key
    entry.run(_main)


if __name__ == "__main__":
    main()
