"""``Trainer``: validate, build (``build.build_run``), train (``loop.train``), tear down.

    Trainer(cfg, run_dir).run()

``cfg`` is the composed config (validated and made typed here) or a ``RunConfig`` already validated
by the entry point. ``keep_process_group`` lets one process run several jobs (the parity tests).
"""

from __future__ import annotations

from pathlib import Path

from pretrain.checkpoint.store import TrainState
from pretrain.config import RunConfig, typed
from pretrain.engine import groups
from pretrain.train.build import build_run
from pretrain.train.faults import StopRequest
from pretrain.train.loop import train
from pretrain.validate import validate


class Trainer:
    def __init__(self, cfg, run_dir: Path):
        if not isinstance(cfg, RunConfig):
            validate(cfg, groups.world_size_from_env())
            cfg = typed(cfg)
        self.cfg = cfg
        self.run_dir = Path(run_dir)

    def run(self, keep_process_group: bool = False) -> TrainState:
        """Train on every launched rank; stop signals are turned into a checkpoint and exit code 75."""
        stop_request = StopRequest().install()
        try:
            return train(build_run(self.cfg, self.run_dir, stop_request))
        finally:
            stop_request.uninstall()
            groups.shutdown(keep_default_group=keep_process_group)
