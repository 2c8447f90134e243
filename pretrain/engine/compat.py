"""CPU compatibility for megatron-core's CUDA assumptions.

This is the only place that knows the machine may lack a GPU. ``apply()`` is a no-op when CUDA
is available, so the GPU path is megatron-core's own code, untouched. Without CUDA it:

- makes ``torch.cuda.current_device()`` return the CPU device (megatron-core allocates buffers
  with ``device=torch.cuda.current_device()`` in ~30 places, including the sequence-parallel
  gather/scatter mappings);
- replaces the CUDA RNG tracker (used to fork dropout RNG inside tensor-parallel regions) with
  one that keeps ``torch.Generator`` states of the CPU generator;
- stops DeepSpeed from JIT-compiling its shared-memory communication op at start-up
  (40-140 s of compilation for an op that gloo training never uses);
- tells DeepSpeed to use its CPU accelerator (``select_cpu_accelerator``, before DeepSpeed is
  imported), instead of its probe warning that no GPU was found.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch

_applied = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def select_cpu_accelerator() -> None:
    """DS_ACCELERATOR=cpu when there is no GPU and the user chose nothing. Call before importing DeepSpeed."""
    if not cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def dist_backend() -> str:
    return "nccl" if cuda_available() else "gloo"


class CpuRNGStatesTracker:
    """Drop-in for megatron-core's CudaRNGStatesTracker that forks the CPU generator."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already tracked")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already tracked")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def apply() -> None:
    """Patch the CUDA-only call sites when CUDA is absent. Idempotent; call before building models."""
    global _applied
    if _applied or cuda_available():
        return
    torch.cuda.current_device = lambda: torch.device("cpu")

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    # `import deepspeed.comm.torch as m` would bind the torch package itself (deepspeed.comm
    # re-exports it), so reach the module through importlib.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    _applied = True


def seed_model_parallel_rng(seed: int) -> None:
    """Seed the tracked RNG streams: one shared by the TP group, one distinct per TP rank.

    Call on every rank after the process groups exist.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    if cuda_available():
        mp_random.model_parallel_cuda_manual_seed(seed)
        return
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
