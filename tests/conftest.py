"""Every test starts from the same environment.

A test that runs a command in this process (generate, Trainer.run) may create a one-process group,
which writes MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE into os.environ (distributed.init_distributed).
Inherited by a later test's `python -m pretrain.train`, those would point it at this process's
TCPStore. The environment is restored after each test, and harness.child_env() drops them.
"""

import os

import pytest
import torch

# Triton binds every @triton.jit function to the interpreter or the compiler when it is defined, and
# triton.language's own functions are defined when triton is first imported, which megatron-core and
# DeepSpeed do while the test modules are collected. The kernel tests run the kernels interpreted on
# CPU, so the mode is chosen here, before any test module is imported (pretrain_kernels names the
# error otherwise: kernels/_compat.check_binding). The default backend "auto" still runs the PyTorch
# reference for CPU tensors, so no other test runs a Triton kernel. A CUDA machine keeps its setting.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _restore_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# The single-node Slurm (tests/slurm_cluster.py), registered here once so that every test module
# shares one controller on its fixed ports.
from slurm_cluster import slurm  # noqa: E402, F401
