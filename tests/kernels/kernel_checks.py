"""Helpers shared by the kernel tests."""

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64 (the absolute norm where expected is all zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.norm().item()
    return (a - e).norm().item() / (scale if scale > 0 else 1.0)


# Acceptance thresholds of issue 4, relative to a float64 reference on the same (rounded) inputs.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
