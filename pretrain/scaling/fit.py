"""The Chinchilla loss law, its Epoch AI-style fit, bootstrap intervals and the compute optimum.

L(N, D) = E + A / N^alpha + B / D^beta, parameterised as in Hoffmann et al. 2022 and Besiroglu et
al. 2024 by theta = (a, b, e, alpha, beta) with A = e^a, B = e^b, E = e^e, so that
log L = LSE(a - alpha log N, b - beta log D, e). The objective is the Huber loss (delta 1e-3) of the
residuals log L_pred - log L_obs, summed over runs, minimised by L-BFGS (scipy's L-BFGS-B, analytic
gradient) from the best points of a grid of starts; the lowest objective wins. Bootstrap: resample
the runs with replacement, refit, and take the 2.5 / 97.5 percentiles of each quantity.

Compute optimum for C = 6 N D: N_opt = G (C/6)^a_exp, D_opt = G^-1 (C/6)^b_exp with
a_exp = beta / (alpha + beta), b_exp = alpha / (alpha + beta), G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")
# Hoffmann et al. 2022 / Besiroglu et al. 2024 grid of initial values, in theta = (a, b, e, alpha, beta).
DEFAULT_GRID = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
DEFAULT_STARTS = 32  # L-BFGS runs from this many of the grid's best points (the whole grid is evaluated)


def law(N, D, E: float, A: float, B: float, alpha: float, beta: float):
    """The loss the law predicts for N parameters trained on D tokens."""
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return E + A / N ** alpha + B / D ** beta


def _log_pred(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray):
    """log L_pred for many thetas (k, 5) at once: (k, n), plus the softmax weights of the three terms."""
    a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
    terms = np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, (theta.shape[0], logN.size))])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    s = w.sum(axis=0)
    return top + np.log(s), w / s


def _huber(r: np.ndarray, delta: float):
    small = np.abs(r) <= delta
    return np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))


def objective(theta, logN, logD, logL, weights=None, delta: float = HUBER_DELTA):
    """The summed Huber loss of log residuals, scaled by 1/delta^2 (same minimiser, well-scaled for
    L-BFGS's tolerances), and its gradient in theta."""
    theta = np.asarray(theta, dtype=float).reshape(1, 5)
    pred, w = _log_pred(theta, logN, logD)
    r = pred[0] - logL
    wt = np.ones_like(r) if weights is None else weights
    value = float(np.sum(wt * _huber(r, delta))) / delta ** 2
    dr = wt * np.clip(r, -delta, delta) / delta ** 2
    w1, w2, w3 = w[0, 0], w[1, 0], w[2, 0]
    grad = np.array([np.sum(dr * w1), np.sum(dr * w2), np.sum(dr * w3),
                     -np.sum(dr * w1 * logN), -np.sum(dr * w2 * logD)])
    return value, grad


def grid_points(grid: Optional[dict] = None) -> np.ndarray:
    grid = grid or DEFAULT_GRID
    return np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])), dtype=float)


def _grid_objectives(points: np.ndarray, logN, logD, logL, weights, delta) -> np.ndarray:
    out = np.empty(len(points))
    for i in range(0, len(points), 2048):
        pred, _ = _log_pred(points[i:i + 2048], logN, logD)
        out[i:i + 2048] = (weights * _huber(pred - logL, delta)).sum(axis=1)
    return out


@dataclass
class Fit:
    """One fit: theta = (a, b, e, alpha, beta), its objective, and the law's parameters."""

    theta: np.ndarray
    objective: float
    starts: int
    converged: int

    @property
    def params(self) -> dict:
        a, b, e, alpha, beta = (float(x) for x in self.theta)
        return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta}


def fit_law(N: Sequence[float], D: Sequence[float], L: Sequence[float], *, grid: Optional[dict] = None,
            starts: int = DEFAULT_STARTS, extra_starts: Sequence[np.ndarray] = (), weights=None,
            delta: float = HUBER_DELTA) -> Fit:
    """Fit the law to (N, D, L): evaluate the objective over the grid, run L-BFGS from its `starts`
    best points (and any `extra_starts`), keep the lowest objective."""
    logN, logD, logL = (np.log(np.asarray(x, dtype=float)) for x in (N, D, L))
    wt = np.ones_like(logL) if weights is None else np.asarray(weights, dtype=float)
    points = grid_points(grid)
    values = _grid_objectives(points, logN, logD, logL, wt, delta)
    chosen = [points[i] for i in np.argsort(values)[:max(1, starts)]] + [np.asarray(x, float) for x in extra_starts]
    best, converged = None, 0
    for x0 in chosen:
        res = minimize(objective, x0, args=(logN, logD, logL, wt, delta), jac=True, method="L-BFGS-B",
                       options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10})
        converged += bool(res.success)
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    return Fit(theta=np.asarray(best.x, dtype=float), objective=float(best.fun) * delta ** 2,
               starts=len(chosen), converged=converged)


def optimum(params: dict, C) -> tuple[np.ndarray, np.ndarray]:
    """The compute-optimal (N_opt, D_opt) for budgets C = 6 N D under the law."""
    E, A, B, alpha, beta = (params[k] for k in PARAM_NAMES)
    C = np.asarray(C, dtype=float)
    G = np.power(alpha * A / (beta * B), 1.0 / (alpha + beta))  # NaN, not complex, for an exponent <= 0
    a_exp, b_exp = beta / (alpha + beta), alpha / (alpha + beta)
    return G * (C / 6.0) ** a_exp, (C / 6.0) ** b_exp / G


def derived(params: dict, budgets: Sequence[float]) -> dict:
    """Exponents, G, and for each budget N_opt, D_opt, tokens per parameter and the optimal loss."""
    alpha, beta = params["alpha"], params["beta"]
    n_opt, d_opt = optimum(params, budgets)
    return {
        "a_exp": beta / (alpha + beta),
        "b_exp": alpha / (alpha + beta),
        # np.power: a refit with an exponent <= 0 gives NaN (dropped from the intervals), not a complex G.
        "G": float(np.power(alpha * params["A"] / (beta * params["B"]), 1.0 / (alpha + beta))),
        "at_budget": [
            {"C": float(c), "N_opt": float(n), "D_opt": float(d), "tokens_per_parameter": float(d / n),
             "loss": float(law(n, d, **params))}
            for c, n, d in zip(budgets, n_opt, d_opt)
        ],
    }


@dataclass
class Bootstrap:
    """Bootstrap replicates of the fit and their percentile intervals."""

    samples: list = field(default_factory=list)  # one dict of quantities per replicate
    intervals: dict = field(default_factory=dict)  # quantity -> [low, high]


def _quantities(params: dict, budgets: Sequence[float]) -> dict:
    d = derived(params, budgets)
    q = dict(params)
    q["a_exp"], q["b_exp"] = d["a_exp"], d["b_exp"]
    for row in d["at_budget"]:
        q[f"tokens_per_parameter@{row['C']:.3g}"] = row["tokens_per_parameter"]
    return q


def bootstrap(N, D, L, best: Fit, *, samples: int = 200, seed: int = 0, budgets: Sequence[float] = (),
              grid: Optional[dict] = None, starts: int = 8, level: float = 0.95) -> Bootstrap:
    """Resample the runs with replacement `samples` times, refit each (grid starts plus the full-data
    optimum as one more start), and take the central `level` percentile interval of every quantity."""
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    rng = np.random.default_rng(seed)
    out = Bootstrap()
    n = len(L)
    for _ in range(samples):
        counts = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        keep = counts > 0
        fit = fit_law(N[keep], D[keep], L[keep], grid=grid, starts=starts, extra_starts=[best.theta],
                      weights=counts[keep])
        out.samples.append(_quantities(fit.params, budgets))
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    if out.samples:
        for key in out.samples[0]:
            vals = np.array([s[key] for s in out.samples], dtype=float)
            vals = vals[np.isfinite(vals)]
            out.intervals[key] = [float(np.percentile(vals, lo)), float(np.percentile(vals, hi))] if vals.size else [None, None]
    return out


def summarize(N, D, L, *, samples: int = 200, seed: int = 0, budgets: Optional[Sequence[float]] = None,
              grid: Optional[dict] = None, starts: int = DEFAULT_STARTS, bootstrap_starts: int = 8) -> dict:
    """The fit, its intervals and the derived optimum, as JSON-ready data."""
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    if budgets is None:
        C = 6 * N * D
        budgets = [float(x) for x in np.logspace(np.log10(C.min()), np.log10(C.max()), 3)] + [1e21, 1e23, 1e25]
    best = fit_law(N, D, L, grid=grid, starts=starts)
    boot = bootstrap(N, D, L, best, samples=samples, seed=seed, budgets=budgets, grid=grid, starts=bootstrap_starts)
    pred = law(N, D, **best.params)
    return {
        "law": "L(N, D) = E + A / N^alpha + B / D^beta",
        "method": {"loss": "huber", "delta": HUBER_DELTA, "residuals": "log L_pred - log L_obs",
                   "optimizer": "L-BFGS-B", "starts": best.starts, "converged": best.converged,
                   "bootstrap_samples": samples, "bootstrap_starts": bootstrap_starts, "seed": seed,
                   "interval": "2.5/97.5 percentiles"},
        "params": best.params,
        "theta": dict(zip(("a", "b", "e", "alpha", "beta"), (float(x) for x in best.theta))),
        "objective": best.objective,
        "rms_log_residual": float(np.sqrt(np.mean((np.log(pred) - np.log(L)) ** 2))),
        "intervals": boot.intervals,
        "optimum": derived(best.params, budgets),
    }
