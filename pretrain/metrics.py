"""Reading a run's metrics.jsonl (written by callbacks.MetricsFile on the logging rank)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir) -> list[dict]:
    """All records of a run, in order (train steps, with val_* keys at evaluation steps)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
