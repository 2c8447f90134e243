"""``python -m pretrain.sweep CONFIG [KEY=VALUE ...] [--dry-run] [--fit] [--no-fit]``.

CONFIG is a shipped sweep (``isoflop-cpu``: pretrain/conf/sweep/isoflop-cpu.yaml) or a YAML file.
An override whose key is a sweep setting (``budgets=[1e12,3e12]``, ``dir=runs/s1``, ``launcher=slurm``,
``fit.bootstrap=50``) changes the sweep; any other (``trainer.seed=2``, ``data=tiny``) is a training
override appended to the sweep's ``train`` list.

Plans every (budget, shape) point, validates them all, prepares the data once, launches all points
as one Hydra multirun of pretrain.train through the configured launcher, records each run's N, D, C
and final validation loss, then fits the scaling law (fit.json and PNGs in the sweep directory).
``--dry-run`` prints the points and the command and launches (and writes) nothing; ``--fit`` only fits
the runs already in the sweep directory; ``--no-fit`` skips the fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Optional

from pretrain.errors import UserError, user_errors
from pretrain.sweep.config import SweepConfig, load
from pretrain.sweep.plan import Point, plan
from pretrain.sweep import run as runs


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(sweep overrides, training overrides) by the key's first part."""
    sweep_keys = {f.name for f in dataclasses.fields(SweepConfig)}
    mine, train = [], []
    for arg in overrides:
        if "=" not in arg:
            raise UserError(f"{arg}: an override is KEY=VALUE (a sweep setting, or a training override)")
        key = arg.partition("=")[0].lstrip("+~")
        (mine if key.split(".")[0] in sweep_keys else train).append(arg)
    return mine, train


def table(sweep: SweepConfig, points: list[Point]) -> str:
    rule = "C = 6 N D" if sweep.flops == "6ND" else "C = F D (F: the framework's FLOPs per token)"
    head = (f"sweep {sweep.name}: {len(sweep.budgets)} budget(s) x {len(sweep.shapes)} shape(s) = {len(points)} runs; "
            f"{rule}, N = non-embedding parameters; steps = ceil(D / batch tokens); launcher {sweep.launcher}")
    cols = ("point", "C asked", "shape", "N", "D", "steps", "tokens/param", "warmup", "decay end", "C actual")
    rows = [(p.name, f"{p.budget:.3g}", p.shape, f"{p.N:,}", f"{p.D:,}", str(p.steps), f"{p.tokens_per_parameter:.1f}",
             f"{p.warmup_tokens:,}", f"{p.decay_tokens:,}", f"{p.C:.4g}") for p in points]
    widths = [max(len(r[i]) for r in (cols, *rows)) for i in range(len(cols))]
    line = lambda r: "  ".join(c.ljust(w) if i in (0, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([head, line(cols), *map(line, rows)])


def sweep_command(args) -> int:
    mine, train = split_overrides(args.overrides)
    sweep, path = load(args.config, mine)
    sweep.train = [*sweep.train, *train]
    points = plan(sweep)
    directory = runs.sweep_dir(sweep)
    cmd = runs.command(sweep, points, directory)
    print(table(sweep, points))
    if args.dry_run:
        print(f"\npoint configs (written to {directory / 'conf' / 'sweep_point'} at launch), beside the shape's "
              "model settings:")
        for p in points:
            print(f"  {p.name}: " + " ".join(f"{k}={v}" for k, v in runs_settings(p).items()))
        print(f"\ncommand:\n{runs.show(cmd)}")
        return 0
    if args.fit:
        return _fit(sweep, points, directory)
    again = [p.name for p in points if (directory / p.name / "metrics.jsonl").is_file()]
    if again:
        print(f"sweep: note: {len(again)} run(s) already in {directory}: each resumes from its newest checkpoint "
              "if it has one (checkpoint.resume=auto), else starts again; --fit refits without training", file=sys.stderr)
    runs.write_plan(sweep, points, directory, cmd)
    if sweep.prepare_data:
        took = runs.prepare(sweep)
        if took is not None:
            print(f"sweep: data ready ({took:.0f} s); every run reads it from the cache")
    print(f"sweep: launching {len(points)} runs into {directory}\n{runs.show(cmd)}", flush=True)
    start = time.perf_counter()
    code = runs.launch(cmd)
    runs.note_times(directory, launch=time.perf_counter() - start)
    if code != 0:
        _, problems = runs.collect(points, directory)
        print(f"sweep: the multirun exited {code}; " + "; ".join(problems or ["see its output above"]), file=sys.stderr)
        return 1
    if args.no_fit or not sweep.fit.enabled:
        _, problems = runs.collect(points, directory)
        return _report(problems)
    return _fit(sweep, points, directory)


def runs_settings(point: Point) -> dict:
    from pretrain.sweep.plan import derived_settings

    return {**derived_settings(point), **dict(o.split("=", 1) for o in point.train)}


def _fit(sweep: SweepConfig, points: list[Point], directory) -> int:
    finished, problems = runs.collect(points, directory)
    _report(problems)
    if len(finished) < len(points):
        print(f"sweep: fitting the {len(finished)} finished runs of {len(points)}", file=sys.stderr)
    start = time.perf_counter()
    code = runs.fit(sweep, finished, directory)
    runs.note_times(directory, fit=time.perf_counter() - start)
    return code


def _report(problems: list[str]) -> int:
    for problem in problems:
        print(f"sweep: {problem}", file=sys.stderr)
    return 1 if problems else 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pretrain.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="a shipped sweep name (pretrain/conf/sweep/) or a sweep YAML file")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE: sweep settings, or training overrides")
    ap.add_argument("--dry-run", action="store_true", help="print the points and the command; launch nothing")
    ap.add_argument("--fit", action="store_true", help="only fit the runs already in the sweep directory")
    ap.add_argument("--no-fit", action="store_true", help="launch, record, but do not fit")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    with user_errors("sweep", debug=args.debug):
        return sweep_command(args)


if __name__ == "__main__":
    sys.exit(main())
