"""The sweep config (``pretrain/conf/sweep/*.yaml``): its schema, loading it, and its own checks.

A sweep is budgets x shapes: every compute budget C (FLOPs) is spent once on every model shape.
The checks here need nothing but the file; the ones that need the composed training config (a
budget too small for one step of a shape, the training overrides the sweep owns) are in ``plan``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from pretrain.errors import UserError

SWEEP_DIR = Path(__file__).resolve().parents[1] / "conf" / "sweep"
FLOP_RULES = ("6ND", "framework")
# Keys a shape may hold besides ModelConfig's fields.
SHAPE_KEYS = ("name", "preset", "train")


class SweepConfigError(UserError):
    """A sweep config that cannot be run; the message lists every problem."""

    def __init__(self, source: str, problems: list[str]):
        super().__init__(f"{source}: " + ("; ".join(problems) if len(problems) < 2
                                          else "\n  - " + "\n  - ".join(problems)))


@dataclass
class FitSettings:
    """``python -m pretrain.scaling fit`` over the sweep's runs, into the sweep directory."""

    enabled: bool = True
    bootstrap: int = 200  # resamples
    seed: int = 0
    starts: int = 32  # L-BFGS starts of the fit (the grid's best points)
    bootstrap_starts: int = 8  # per bootstrap refit


@dataclass
class SweepConfig:
    name: str = MISSING
    # The sweep directory: one run directory per point, sweep.json, fit.json and the PNGs.
    # None: runs/sweep-<name>, relative to where the command runs.
    dir: Optional[str] = None
    budgets: list = MISSING  # compute budgets C, FLOPs
    # Model shapes: ModelConfig fields (num_layers, hidden_size, num_attention_heads, ...), optionally a
    # model preset (``preset: gpt3-small``), a ``name`` for the run directories and ``train`` overrides
    # for this shape only (``optim.lr=3e-4``).
    shapes: list = MISSING
    # Training overrides shared by every run, as on pretrain.train's command line.
    train: list = field(default_factory=list)
    # 6ND: C = 6 N D, N the non-embedding (attention + MLP) matmul parameters, the count
    # ``pretrain.scaling fit`` uses. framework: C = D x pretrain.flops.model_flops_per_token
    # (6 x matmul parameters incl. the LM head, plus attention's 12 L h s), the count MFU uses.
    flops: str = "6ND"
    warmup_fraction: float = 0.05  # of each run's own tokens; cosine decay to that run's end
    min_steps: int = 1  # a point with fewer optimizer steps is an error
    launcher: str = "basic"  # basic (Hydra's own: one point after another) | a conf/hydra/launcher name
    launcher_settings: dict = field(default_factory=dict)  # hydra.launcher.KEY values
    prepare_data: bool = True  # prepare (or find cached) the data once before launching
    fit: FitSettings = field(default_factory=FitSettings)


def resolve_path(config: str) -> Path:
    """A sweep name (``isoflop-cpu``: pretrain/conf/sweep/isoflop-cpu.yaml) or a YAML file's path."""
    path = Path(config)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"{config}: no such sweep config file")
        return path
    shipped = SWEEP_DIR / f"{config}.yaml"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in SWEEP_DIR.glob("*.yaml")))
        raise UserError(f"{config}: not a sweep config file, nor a shipped sweep (shipped: {names})")
    return shipped


def load(config: str, overrides: list[str]) -> tuple[SweepConfig, Path]:
    """The sweep config from ``config`` (name or path) with ``KEY=VALUE`` overrides, checked."""
    path = resolve_path(config)
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # a YAML syntax error
        raise UserError(f"{path}: not readable YAML ({err})") from err
    if not isinstance(raw, DictConfig):
        raise UserError(f"{path}: expected a mapping of sweep settings")
    known = [f.name for f in dataclasses.fields(SweepConfig)]
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise SweepConfigError(str(path), [f"unknown key {k!r} (valid keys: {', '.join(known)})" for k in unknown])
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), raw, OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.to_object(merged)
    except Exception as err:  # a wrong type, an unknown override, a missing value
        raise SweepConfigError(str(path), [str(err).splitlines()[0]]) from err
    check(cfg, str(path))
    return cfg, path


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def model_fields() -> list[str]:
    from pretrain.config import ModelConfig

    return [f.name for f in dataclasses.fields(ModelConfig) if f.name != "name"]


def shape_name(shape: dict) -> str:
    """The shape's name in run directories: its ``name``, else the preset and L<layers>-h<hidden>."""
    if shape.get("name"):
        return str(shape["name"])
    parts = [str(shape["preset"])] if shape.get("preset") else []
    parts += [f"{tag}{shape[key]}" for tag, key in (("L", "num_layers"), ("h", "hidden_size"),
                                                      ("a", "num_attention_heads")) if key in shape]
    return "-".join(parts) or "default"


def check(cfg: SweepConfig, source: str) -> None:
    """Every problem the sweep config has on its own, at once."""
    problems = []
    cfg.budgets = [_plain(b) for b in _plain(cfg.budgets)]
    cfg.shapes = [_plain(s) for s in _plain(cfg.shapes)]
    cfg.train = [str(t) for t in _plain(cfg.train)]
    cfg.launcher_settings = _plain(cfg.launcher_settings)
    if not cfg.budgets:
        problems.append("budgets: empty; list the compute budgets C in FLOPs, e.g. budgets: [1e12, 3e12, 1e13]")
    for i, c in enumerate(cfg.budgets):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
            problems.append(f"budgets[{i}]={c!r}: a budget is a positive number of FLOPs (e.g. 3e12)")
    if len(set(map(str, cfg.budgets))) != len(cfg.budgets):
        problems.append(f"budgets: {cfg.budgets} lists a budget twice")
    if not cfg.shapes:
        problems.append("shapes: empty; list model shapes, e.g. - {num_layers: 2, hidden_size: 64, num_attention_heads: 2}")
    fields = model_fields()
    names = []
    for i, shape in enumerate(cfg.shapes):
        if not isinstance(shape, dict):
            problems.append(f"shapes[{i}]={shape!r}: a shape is a mapping of model settings")
            continue
        for key in shape:
            if key not in fields and key not in SHAPE_KEYS:
                problems.append(f"shapes[{i}].{key}: not a model setting (model settings: {', '.join(fields)}; "
                                f"also {', '.join(SHAPE_KEYS)})")
        if not isinstance(shape.get("train", []), list):
            problems.append(f"shapes[{i}].train: a list of training overrides (e.g. [optim.lr=3e-4])")
        names.append(shape_name(shape))
        if not re.fullmatch(r"[\w.+-]+", names[-1]):
            problems.append(f"shapes[{i}]: name {names[-1]!r}: letters, digits, '.', '+', '-' and '_' only "
                            "(it names the run directory)")
    doubles = sorted({n for n in names if names.count(n) > 1})
    if doubles:
        problems.append(f"shapes: {', '.join(doubles)} named twice; give the shapes distinct settings or names")
    if cfg.flops not in FLOP_RULES:
        problems.append(f"flops={cfg.flops!r}: one of {', '.join(FLOP_RULES)}")
    if not 0 <= cfg.warmup_fraction < 1:
        problems.append(f"warmup_fraction={cfg.warmup_fraction}: a fraction of each run's tokens in [0, 1)")
    if cfg.min_steps < 1:
        problems.append(f"min_steps={cfg.min_steps}: at least 1")
    if cfg.fit.bootstrap < 0:
        problems.append(f"fit.bootstrap={cfg.fit.bootstrap}: 0 or more resamples")
    if cfg.fit.starts < 1 or cfg.fit.bootstrap_starts < 1:
        problems.append(f"fit.starts={cfg.fit.starts}, fit.bootstrap_starts={cfg.fit.bootstrap_starts}: at least 1 each")
    if cfg.fit.enabled and len(cfg.budgets) * len(cfg.shapes) < 5:
        problems.append(f"{len(cfg.budgets)} budget(s) x {len(cfg.shapes)} shape(s) = "
                        f"{len(cfg.budgets) * len(cfg.shapes)} runs: the fitted law has 5 parameters, so at least "
                        "5 runs are needed (or fit.enabled=false)")
    launchers = launcher_names()
    if cfg.launcher not in launchers:
        problems.append(f"launcher={cfg.launcher!r}: one of {', '.join(launchers)}")
    elif cfg.launcher == "basic" and cfg.launcher_settings:
        problems.append("launcher_settings: Hydra's basic launcher has no settings; name another launcher (slurm)")
    if problems:
        raise SweepConfigError(source, problems)


def launcher_names() -> list[str]:
    """basic, the project's launchers (conf/hydra/launcher/) and the installed submitit ones."""
    conf = SWEEP_DIR.parent / "hydra" / "launcher"
    names = ["basic", *sorted(p.stem for p in conf.glob("*.yaml"))]
    try:
        if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
            names += ["submitit_local", "submitit_slurm"]
    except ImportError:  # no hydra_plugins package at all
        pass
    return names
