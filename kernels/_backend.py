"""Which implementation a kernel call runs: Triton or the PyTorch reference.

The choice is made per call, inside the custom ops, from the tensor's device and one process-wide
setting. The setting comes from `set_backend(...)` if it was called, else from the environment
variable PRETRAIN_KERNELS_BACKEND, else "auto".
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "PRETRAIN_KERNELS_BACKEND"

_backend: str | None = None  # None: follow the environment variable


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown kernel backend {name!r}; expected one of {BACKENDS}")
    return name


def _check_triton_possible(where: str) -> None:
    if not torch.cuda.is_available() and not interpreting():
        raise RuntimeError(
            f"{where}: the Triton backend needs a CUDA GPU, or the Triton interpreter on CPU "
            "(set TRITON_INTERPRET=1 before the first kernel call); use 'auto' or 'reference' here"
        )


def set_backend(name: str) -> None:
    """Select the kernel backend for the whole process.

    "auto": Triton for CUDA tensors, the PyTorch reference for CPU tensors.
    "triton": always Triton. On CPU this is only valid under TRITON_INTERPRET=1 (for tests).
    "reference": always the PyTorch reference (any device).
    """
    global _backend
    _check_name(name, "set_backend")
    if name == "triton":
        _check_triton_possible("set_backend('triton')")
    _backend = name


def get_backend() -> str:
    """The backend in force: the one set with set_backend, else $PRETRAIN_KERNELS_BACKEND, else 'auto'."""
    if _backend is not None:
        return _backend
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


def use_triton(x: torch.Tensor) -> bool:
    """Whether a call whose main input is `x` runs the Triton kernels."""
    backend = get_backend()
    if backend == "reference":
        return False
    if backend == "auto":
        # float64 has no tensor-core path: the reference is the better kernel for it.
        return x.is_cuda and x.dtype != torch.float64
    if x.device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "kernel backend 'triton' was forced for a CPU tensor, but TRITON_INTERPRET=1 is not set; "
            "the Triton interpreter is the only way to run these kernels on CPU"
        )
    if x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"kernel backend 'triton' does not support device {x.device}")
    return True
