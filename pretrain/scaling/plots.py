"""The scaling fit's PNGs (matplotlib, Agg): IsoFLOP curves, the fitted frontier, N_opt and D_opt.

``isoflop_groups`` groups runs whose compute C = 6 N D lies within a factor of each other (a sweep's
budgets); each group's plot shows its runs' losses against N, the law along that budget,
L(N, C / (6 N)), and the law's minimum there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pretrain.scaling.fit import law, optimum



def _save(fig, ax, path: Path) -> Path:
    """Legend, layout, PNG at 120 dpi; the figure closed. The path written."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

def isoflop_groups(C, tolerance_decades: float = 0.15) -> list[list[int]]:
    """Indices of runs grouped by similar compute: sorted by log10 C, a new group wherever the gap to
    the previous run exceeds `tolerance_decades`."""
    logc = np.log10(np.asarray(C, dtype=float))
    order = np.argsort(logc)
    groups: list[list[int]] = []
    for i in order:
        if groups and logc[i] - logc[groups[-1][-1]] <= tolerance_decades:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return groups


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(out: Path, N, D, L, params: dict) -> list[Path]:
    """Write isoflop.png, frontier.png and optimal.png under `out`; their paths."""
    plt = _pyplot()
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    C = 6 * N * D
    groups = isoflop_groups(C)
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(groups))))
    paths = []

    fig, ax = plt.subplots(figsize=(7, 5))
    group_minima = []
    for color, idx in zip(colors, groups):
        c = float(np.exp(np.mean(np.log(C[idx]))))
        ax.scatter(N[idx], L[idx], color=color, label=f"C = {c:.2g}", zorder=3)
        n_opt, d_opt = optimum(params, c)
        lo, hi = min(N[idx].min(), n_opt) / 2, max(N[idx].max(), n_opt) * 2
        grid = np.logspace(np.log10(lo), np.log10(hi), 200)
        ax.plot(grid, law(grid, c / (6 * grid), **params), color=color)
        ax.scatter([n_opt], [law(n_opt, d_opt, **params)], color=color, marker="*", s=150, edgecolor="k", zorder=4)
        best = idx[int(np.argmin(L[idx]))]
        group_minima.append((c, N[best], D[best]))
    ax.set(xscale="log", xlabel="parameters N (non-embedding)", ylabel="final validation loss",
           title="IsoFLOP curves (lines: fitted law; stars: its minimum)")
    paths.append(_save(fig, ax, out / "isoflop.png"))

    budgets = np.logspace(np.log10(C.min()) - 1, np.log10(C.max()) + 2, 200)
    n_opt, d_opt = optimum(params, budgets)
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter(C, L, color="C0", label="runs", zorder=3)
    ax.plot(budgets, law(n_opt, d_opt, **params), color="C1", label="compute-optimal frontier")
    ax.axhline(params["E"], color="gray", ls="--", lw=1, label=f"E = {params['E']:.3g}")
    ax.set(xscale="log", xlabel="compute C = 6 N D (FLOPs)", ylabel="loss", title="Fitted frontier L_opt(C)")
    paths.append(_save(fig, ax, out / "frontier.png"))

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot(budgets, n_opt, color="C0", label="N_opt(C) (fit)")
    ax.plot(budgets, d_opt, color="C1", label="D_opt(C) (fit)")
    if group_minima:
        gc, gn, gd = (np.array(x) for x in zip(*group_minima))
        ax.scatter(gc, gn, color="C0", marker="o", label="lowest-loss run per budget: N")
        ax.scatter(gc, gd, color="C1", marker="s", label="lowest-loss run per budget: D")
    ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N (parameters), D (tokens)",
           title="Compute-optimal N and D")
    paths.append(_save(fig, ax, out / "optimal.png"))
    return paths
