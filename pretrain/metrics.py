"""Run outputs on the logging rank: metrics.jsonl, the progress bar, and the loss-curve PNG."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per logged step to <run dir>/metrics.jsonl (kept across resumes)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(run_dir) -> Path | None:
    """Write <run dir>/loss.png (train loss against tokens). A failure to plot only warns."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [r for r in read_metrics(run_dir) if "loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["tokens"] for r in records], [r["loss"] for r in records], label="train")
        evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
        if evals:
            ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(os.path.basename(os.path.abspath(run_dir)))
        ax.grid(alpha=0.3)
        ax.legend()
        out = Path(run_dir) / "loss.png"
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
    except Exception as exc:  # plotting must never take down a finished run
        log.warning("could not write the loss plot: %s", exc)
        return None
