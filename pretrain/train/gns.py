"""Gradient noise scale (McCandlish et al. 2018), measured for free from data parallelism.

Two gradient norms at the same weights and the same step:
- small batch: each data-parallel rank's own gradient before the all-reduce (B_small examples,
  its micro-batches x accumulation), averaged over ranks: E|G_small|^2;
- big batch: the all-reduced gradient (B_big = B_small x dp examples): |G_big|^2.
With dp == 1 and gradient accumulation, the micro-batch gradients play the small batch instead.

Unbiased per-step estimates (REFERENCE.md):
    |G|^2     ~= (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~= (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)
Each is noisy (and can be negative); both are smoothed by a bias-corrected EMA before the ratio
B_simple = tr(Sigma) / |G|^2, the critical batch size in examples (x seq_length for tokens).

Cost: the small-batch norm needs one fp32 copy of each rank's gradient when accumulating at pp = 1
(engine.LocalGradTap) and two scalar all-reduces per step; nothing when gradients are not tapped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


def per_step_estimates(small_sq: float, big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) from squared gradient norms at two batch sizes (examples)."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < B_small < B_big, got {b_small}, {b_big}")
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


@dataclass
class NoiseScale:
    """Bias-corrected EMAs of |G|^2 and tr(Sigma); stateful so a resumed run continues smoothly."""

    beta: float = 0.95
    updates: int = 0
    g2_avg: float = 0.0
    trace_avg: float = 0.0

    def update(self, small_sq: float, big_sq: float, b_small: int, b_big: int, seq_length: int) -> dict:
        g2, trace = per_step_estimates(small_sq, big_sq, b_small, b_big)
        self.updates += 1
        self.g2_avg = self.beta * self.g2_avg + (1 - self.beta) * g2
        self.trace_avg = self.beta * self.trace_avg + (1 - self.beta) * trace
        correction = 1 - self.beta**self.updates
        g2_s, trace_s = self.g2_avg / correction, self.trace_avg / correction
        metrics = {
            "gns/g2": g2, "gns/trace": trace, "gns/g2_ema": g2_s, "gns/trace_ema": trace_s,
            "gns/b_small": b_small, "gns/b_big": b_big,
        }
        if g2_s > 0:
            metrics["gns/simple"] = trace_s / g2_s  # examples; the critical batch size
            metrics["gns/simple_tokens"] = metrics["gns/simple"] * seq_length
        return metrics

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
