"""Kernel tests run the Triton kernels in the CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported (kernels/_compat.check_binding), which
megatron-core and DeepSpeed do while other test modules are collected: tests/conftest.py sets it on a
machine without CUDA. Set here too for a run of this folder alone on a CUDA machine.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import pretrain_kernels as pk  # noqa: E402
from pretrain_kernels import _backend  # noqa: E402



@pytest.fixture
def use_backend():
    """Call use_backend("triton" | "reference" | "auto"); the previous setting is restored afterwards."""
    saved = _backend._backend

    def _use(name: str) -> None:
        pk.set_backend(name)

    yield _use
    _backend._backend = saved


@pytest.fixture(autouse=True)
def _restore_backend():
    saved = _backend._backend
    yield
    _backend._backend = saved
