"""Plots of one or more runs: ``python -m pretrain.plot RUN_DIR [RUN_DIR ...] [--out DIR]``.

Writes loss.png (train and validation), lr.png, gns.png (gradient noise scale), throughput.png and
tasks.png (the accuracy of each ``trainer.eval_tasks`` task), each against tokens seen so runs with
different batch sizes line up.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
from pathlib import Path

from pretrain.metrics import read_metrics

log = logging.getLogger(__name__)

# file name -> (y label, [(metric key or fnmatch pattern, legend suffix or None for the matched key, style)])
PANELS = {
    "loss.png": ("loss (nats/token)", [("loss", "train", "-"), ("val_loss", "validation", "o-")]),
    "lr.png": ("learning rate", [("lr", "", "-")]),
    "gns.png": ("critical batch B_simple (tokens)", [("gns/simple_tokens", "", "-")]),
    "throughput.png": ("tokens / s", [("tokens_per_s", "", "-")]),
    "tasks.png": ("accuracy", [("eval/*/acc", None, "o-")]),
}


def _expand(series: list, records: list[dict]) -> list:
    """Each pattern's series once per metric key that it matches, the key's task as its legend."""
    out = []
    for key, suffix, style in series:
        if suffix is not None:
            out.append((key, suffix, style))
            continue
        keys = sorted({k for r in records for k in r if fnmatch.fnmatchcase(k, key)})
        out += [(k, k.split("/")[1], style) for k in keys]
    return out


def plot_runs(run_dirs: list, out_dir) -> list[Path]:
    """Write the panels that have data into out_dir; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).resolve().name: read_metrics(d) for d in run_dirs}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, (ylabel, series) in PANELS.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = 0
        for run, records in runs.items():
            for key, suffix, style in _expand(series, records):
                points = [(r["tokens"], r[key]) for r in records if r.get(key) is not None]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, label=" ".join(x for x in (run if len(runs) > 1 else "", suffix) if x) or key)
                    drawn += 1
        if drawn:
            ax.set_xlabel("tokens")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(out_dir / filename, dpi=100)
            written.append(out_dir / filename)
        plt.close(fig)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: the single run's dir, else ./plots)")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not (Path(run) / "metrics.jsonl").is_file():
            parser.error(f"{run} has no metrics.jsonl; pass run directories written by pretrain.train")
    out = args.out or (args.runs[0] if len(args.runs) == 1 else "plots")
    for path in plot_runs(args.runs, out):
        print(path)


if __name__ == "__main__":
    main()
