"""Compute-optimal sizing: the parameters N and tokens D a GPU-hour budget buys (``--budget-gpu-hours``).

The FLOP budget is C = H x 3600 x peak x MFU: H GPU-hours at the GPU's data-sheet dense bf16 peak and an
assumed model FLOP utilisation (``ASSUMED_MFU`` = 0.40 unless ``--mfu`` says otherwise: the planner
predicts 35-55% for llama-7b on 64 H100 (``--search``), 51% for Korthikanti's 175B and 60-64% for
MosaicML's A100 rows; 0.40 is a cautious middle for a run not yet tuned). Training FLOPs are C = 6 N D
(Kaplan et al. 2020; it leaves out the attention score FLOPs the planner's MFU counts, a few percent at
s = 2048).

With the loss L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022) minimised under 6 N D = C:

    N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = (C/6)^(alpha/(alpha+beta)) / G,
    G = (alpha A / (beta B))^(1/(alpha+beta)).

Fits (../shared/REFERENCE.md): Chinchilla's published constants (E 1.69, A 406.4, B 410.7, alpha 0.34,
beta 0.28), which as rounded put the optimum at about 33B parameters for Chinchilla's own 5.9e23 FLOPs
(the paper's approach 3 also proposes smaller models than its 70B); the 2024 Epoch AI refit of the same
data (Besiroglu et al.: E 1.817, A 482.0, B 2085.4, alpha 0.348, beta 0.366), which gives 73B and 1.3T
tokens there, about 18 tokens per parameter; and the rule of thumb of 20 tokens per parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pretrain.plan.gpus import Cluster
from pretrain.plan.spec import PlanError

ASSUMED_MFU = 0.40
TOKENS_PER_PARAM = 20.0  # Hoffmann et al.'s rule of thumb


@dataclass(frozen=True)
class Fit:
    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def optimum(self, flops: float) -> tuple[float, float]:
        """(N, D) minimising the loss at training compute ``flops`` = 6 N D."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        n = g * (flops / 6) ** (b / (a + b))
        return n, flops / (6 * n)


CHINCHILLA = Fit("chinchilla-2022", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
EPOCH_2024 = Fit("epoch-2024", E=1.817, A=482.0, B=2085.4, alpha=0.348, beta=0.366)
FITS = (CHINCHILLA, EPOCH_2024)


def budget_flops(gpu_hours: float, peak_flops: float, mfu: float = ASSUMED_MFU) -> float:
    if gpu_hours <= 0:
        raise PlanError(f"--budget-gpu-hours must be positive (got {gpu_hours})")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1] (got {mfu})")
    return gpu_hours * 3600 * peak_flops * mfu


def rule_of_thumb(flops: float, tokens_per_param: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    n = math.sqrt(flops / (6 * tokens_per_param))
    return n, tokens_per_param * n


def proposals(flops: float) -> list[dict]:
    """One row per fit: parameters, tokens, tokens per parameter and the fit's predicted loss."""
    rows = []
    for fit in FITS:
        n, d = fit.optimum(flops)
        rows.append({"fit": fit.name, "params": n, "tokens": d, "tokens_per_param": d / n, "loss": fit.loss(n, d)})
    n, d = rule_of_thumb(flops)
    rows.append({"fit": "20-tokens-per-param", "params": n, "tokens": d, "tokens_per_param": d / n,
                 "loss": EPOCH_2024.loss(n, d)})
    return rows


def budget(gpu_hours: float, cluster: Cluster, mfu: float = ASSUMED_MFU, gpus_given: bool = False) -> dict:
    flops = budget_flops(gpu_hours, cluster.gpu.peak_flops, mfu)
    out = {"gpu": cluster.gpu.name, "gpu_hours": gpu_hours, "peak_flops": cluster.gpu.peak_flops, "mfu": mfu,
           "flops": flops, "proposals": proposals(flops)}
    if gpus_given:
        out["gpus"] = cluster.gpus
        out["wall_clock_days"] = gpu_hours / cluster.gpus / 24
    return out


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def table(b: dict) -> str:
    lines = [f"budget {b['gpu_hours']:,.0f} GPU-hours of {b['gpu']} at {b['peak_flops'] / 1e12:.0f} TFLOP/s peak x "
             f"MFU {b['mfu']:.0%} (assumed) = C {b['flops']:.3g} FLOPs (= 6 N D)"]
    if "gpus" in b:
        lines.append(f"on {b['gpus']} GPUs: {b['wall_clock_days']:.1f} days of wall clock")
    lines.append(f"{'fit':<22}{'params N':>10}{'tokens D':>10}{'D/N':>7}{'loss':>7}")
    lines += [f"{p['fit']:<22}{_si(p['params']):>10}{_si(p['tokens']):>10}{p['tokens_per_param']:>7.1f}"
              f"{p['loss']:>7.3f}" for p in b["proposals"]]
    lines.append("loss: each fit's own L(N, D); the 20-tokens row uses the epoch-2024 fit's")
    return "\n".join(lines)
