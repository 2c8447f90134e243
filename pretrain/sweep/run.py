"""Launching a planned sweep as one Hydra multirun, recording each run, and fitting the law.

The sweep directory holds ``conf/sweep_point/<point>.yaml`` (the points' config files),
``sweep.json`` (the sweep config, the points, the command, wall times), one run directory per point
(``<point>/``: pretrain.train's config.yaml and metrics.jsonl, plus ``sweep.json`` with the point's
N, D, C and, once it has run, its final validation loss) and the fit (fit.json, isoflop.png,
frontier.png, optimal.png).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from pretrain.errors import UserError
from pretrain.sweep.config import SweepConfig, shape_name
from pretrain.sweep.plan import GROUP, Point, point_yaml

RECORD = "sweep.json"


def sweep_dir(sweep: SweepConfig) -> Path:
    path = Path(sweep.dir or f"runs/sweep-{sweep.name}").resolve()
    if any(c in str(path) for c in "'\"\n"):
        raise UserError(f"dir={path}: a sweep directory path may not hold quotes or newlines")
    return path


def _quoted(text: str) -> str:
    """A string as a Hydra override value: bare when Hydra's grammar takes it so, else quoted."""
    return text if re.fullmatch(r"[\w/.:+-]+", text) else f"'{text}'"


def _value(value: Any) -> str:
    """A value as a Hydra override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    text = str(value)
    if "'" in text or "\n" in text:
        raise UserError(f"launcher_settings: {text!r}: values may not hold quotes or newlines")
    return _quoted(text)


def command(sweep: SweepConfig, points: list[Point], directory: Path) -> list[str]:
    """The one multirun of pretrain.train that runs every point through the configured launcher."""
    cmd = [sys.executable, "-m", "pretrain.train", "--multirun",
           f"hydra.searchpath=[{_quoted('file://' + str(directory / 'conf'))}]",
           f"+{GROUP}={','.join(p.name for p in points)}",
           f"hydra.sweep.dir={_quoted(str(directory))}",
           f"hydra.sweep.subdir=${{hydra:runtime.choices.{GROUP}}}"]
    if sweep.launcher != "basic":
        cmd.append(f"hydra/launcher={sweep.launcher}")
    cmd += [f"hydra.launcher.{k}={_value(v)}" for k, v in sweep.launcher_settings.items()]
    return cmd + list(sweep.train)


def show(cmd: list[str]) -> str:
    return shlex.join(cmd)


def write_plan(sweep: SweepConfig, points: list[Point], directory: Path, cmd: list[str]) -> None:
    """The points' config files, each run directory's sweep.json (N, D, C) and the sweep's own."""
    conf = directory / "conf" / GROUP
    conf.mkdir(parents=True, exist_ok=True)
    shapes = {shape_name(s): s for s in sweep.shapes}
    for point in points:
        (conf / f"{point.name}.yaml").write_text(point_yaml(point, shapes[point.shape]))
        run = directory / point.name
        run.mkdir(exist_ok=True)
        _write(run / RECORD, point.record(sweep))
    _write(directory / RECORD, {"sweep": dataclasses.asdict(sweep), "command": show(cmd),
                                "points": [p.record(sweep) for p in points]})


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def prepare(sweep: SweepConfig) -> Optional[float]:
    """Prepare the data every run reads once, before the launch (every run then finds it cached);
    the seconds it took, or None for synthetic data."""
    from pretrain.config import compose_training

    cfg = compose_training(list(sweep.train), "sweep training config")
    if cfg.data.name == "synthetic":
        return None
    from pretrain.data import prepare_data, validate_data_config

    start = time.perf_counter()
    validate_data_config(cfg.data)
    prepare_data(cfg.data)
    return time.perf_counter() - start


def launch(cmd: list[str]) -> int:
    """Run the multirun; its exit code (a failed point makes it non-zero after the others ran)."""
    return subprocess.run(cmd).returncode


def final(run: Path) -> Optional[dict]:
    """A run's last step, tokens, training loss and validation loss, or None before it evaluated."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    last: dict = {}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            for key in ("step", "tokens", "loss", "val_loss"):
                if record.get(key) is not None:
                    last[key] = record[key]
            if record.get("val_loss") is not None:
                last["val_step"] = record.get("step")
    return last if "val_loss" in last else None


def collect(points: list[Point], directory: Path) -> tuple[list[Path], list[str]]:
    """Add each finished run's final numbers to its sweep.json; (finished run dirs, problems)."""
    finished, problems = [], []
    for point in points:
        run = directory / point.name
        result = final(run)
        if result is None:
            problems.append(f"{point.name}: no final val_loss in {run / 'metrics.jsonl'} (did the run fail?)")
            continue
        record = json.loads((run / RECORD).read_text()) if (run / RECORD).is_file() else {}
        record["result"] = result
        if result.get("val_step") != point.steps:
            problems.append(f"{point.name}: its last evaluation was at step {result.get('val_step')}, "
                            f"not at its last step {point.steps}")
        if result.get("step") != point.steps or result.get("tokens") != point.D:
            problems.append(f"{point.name}: ran {result.get('step')} steps / {result.get('tokens')} tokens, "
                            f"planned {point.steps} / {point.D}")
        _write(run / RECORD, record)
        finished.append(run)
    return finished, problems


def fit(sweep: SweepConfig, runs: list[Path], directory: Path) -> int:
    """``python -m pretrain.scaling fit`` over the runs, writing fit.json and the PNGs into ``directory``."""
    from pretrain.scaling.__main__ import main as scaling

    f = sweep.fit
    code = scaling(["fit", *map(str, runs), "--out", str(directory), "--bootstrap", str(f.bootstrap),
                    "--seed", str(f.seed), "--starts", str(f.starts), "--bootstrap-starts", str(f.bootstrap_starts)])
    params = json.loads((directory / "fit.json").read_text())["params"] if code == 0 else {}
    if code == 0 and not (params["alpha"] > 0 and params["beta"] > 0):
        print(f"sweep: note: the fit's exponents alpha={params['alpha']:.3g}, beta={params['beta']:.3g} are not both "
              "positive: these runs do not show the loss falling with both N and D (budgets too small or too "
              "close, or too few steps), so the compute optimum is undefined (NaN in fit.json)", file=sys.stderr)
    return code


def note_times(directory: Path, **seconds: float) -> None:
    record = json.loads((directory / RECORD).read_text())
    record.setdefault("wall_s", {}).update({k: round(v, 2) for k, v in seconds.items()})
    _write(directory / RECORD, record)
