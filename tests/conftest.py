"""Every test starts from the same environment.

A test that runs a command in this process (generate, Trainer.run) may create a one-process group,
which writes MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE into os.environ (distributed.init_distributed).
Inherited by a later test's `python -m pretrain.train`, those would point it at this process's
TCPStore. The environment is restored after each test, and harness.child_env() drops them.
"""

import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# The single-node Slurm (tests/slurm_cluster.py), registered here once so that every test module
# shares one controller on its fixed ports.
from slurm_cluster import slurm  # noqa: E402, F401
