"""The sweep's points: for every (budget C, shape) the run's N, tokens D, steps and schedule.

- N: the shape's non-embedding parameters (attention + MLP matmul weights), counted from the
  composed model config as ``pretrain.scaling fit`` counts them.
- D = C / (6 N) under ``flops: 6ND``; D = C / F under ``flops: framework``, F the framework's FLOPs
  per token (``pretrain.flops.model_flops_per_token``: 6 x (N + the LM head's V h) + 12 L h s; V is
  ``model.vocab_size`` or the tokenizer's configured size, padded to ``model.vocab_multiple``).
- steps = ceil(D / (global batch x sequence length)): rounded up, so every run spends at least its
  budget; the run's actual tokens (steps x batch tokens) and actual C are what the records hold.
- Schedule: linear warmup over ``warmup_fraction`` of the run's own tokens, cosine decay ending
  at its last step (``optim.decay_tokens`` = its tokens); one evaluation at the last step.

Each point becomes a config file ``<sweep dir>/conf/sweep_point/<point>.yaml`` (package
``_global_``); the sweep is one Hydra multirun over ``+sweep_point=<every point>``. The same file
is composed here and validated like ``pretrain.train`` validates it, before anything is launched.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from pretrain.config import world_size
from pretrain.errors import UserError
from pretrain.sweep.config import SweepConfig, SweepConfigError, shape_name

GROUP = "sweep_point"
# Training keys the sweep sets for every point: the base and shape overrides may not.
DERIVED = ("trainer.max_steps", "trainer.eval_interval", "optim.warmup_tokens", "optim.decay_tokens")
RESERVED_PREFIXES = ("hydra.", "hydra/", "+sweep_point", "sweep_point")


@dataclass
class Point:
    """One run of the sweep. Tokens are tokens; C is FLOPs under the sweep's rule."""

    name: str
    budget: float  # C asked for
    shape: str
    model: dict  # the shape's model settings (and preset)
    N: int  # non-embedding parameters
    flops_per_token: float  # 6 N, or the framework's count
    batch_tokens: int  # global batch x sequence length
    D_target: float  # budget / flops_per_token
    steps: int
    D: int  # steps x batch_tokens: the run's tokens
    C: float  # D x flops_per_token: the compute actually spent
    warmup_tokens: int
    decay_tokens: int
    train: list = field(default_factory=list)  # the shape's own training overrides

    @property
    def tokens_per_parameter(self) -> float:
        return self.D / self.N

    def record(self, sweep: SweepConfig) -> dict:
        return {"sweep": sweep.name, "flops_rule": sweep.flops, **asdict(self),
                "tokens_per_parameter": self.tokens_per_parameter,
                "N_definition": "non-embedding matmul parameters (attention + MLP weights)",
                "steps_rounding": "ceil(D_target / batch_tokens); D = steps x batch_tokens"}


def _keys(overrides: list[str]) -> list[str]:
    return [o.partition("=")[0].lstrip("+~") for o in overrides]


def _shape_yaml(shape: dict, derived: Optional[dict] = None) -> str:
    """A point's config file: the shape's model settings and preset, its overrides, the derived keys."""
    body = OmegaConf.from_dotlist(list(shape.get("train", [])))
    model = {k: v for k, v in shape.items() if k not in ("name", "preset", "train")}
    if model:
        body = OmegaConf.merge(body, {"model": model})
    if derived:
        body = OmegaConf.merge(body, OmegaConf.from_dotlist([f"{k}={v}" for k, v in derived.items()]))
    if shape.get("preset"):
        body = OmegaConf.merge({"defaults": [{"override /model": shape["preset"]}, "_self_"]}, body)
    return "# @package _global_\n# A point of an IsoFLOP sweep, written by pretrain.sweep.\n" + OmegaConf.to_yaml(body)


class Composer:
    """Compose the training config of a point from its file, as the multirun will."""

    def __init__(self, train: list[str]):
        self.train = train
        self._dir = tempfile.TemporaryDirectory(prefix="pretrain-sweep-")
        (Path(self._dir.name) / GROUP).mkdir()

    def compose(self, name: str, text: str, what: str):
        from pretrain.config import compose_training

        (Path(self._dir.name) / GROUP / f"{name}.yaml").write_text(text)
        return compose_training([f"hydra.searchpath=[file://{self._dir.name}]", f"+{GROUP}={name}", *self.train], what)

    def close(self) -> None:
        self._dir.cleanup()


def _flops_per_token(cfg, rule: str, n: int) -> float:
    if rule == "6ND":
        return 6.0 * n
    from pretrain.config import ModelConfig
    from pretrain.flops import model_flops_per_token

    model = OmegaConf.to_object(cfg.model)
    if not isinstance(model, ModelConfig):
        model = ModelConfig(**model)
    vocab = model.vocab_size or cfg.data.tokenizer.vocab_size
    vocab = model.vocab_multiple * math.ceil(vocab / model.vocab_multiple)
    return float(model_flops_per_token(model, cfg.trainer.seq_length, vocab))


def _base_problems(sweep: SweepConfig) -> list[str]:
    problems = []
    shape_keys = {f"model.{k}" for s in sweep.shapes for k in s if k not in ("name", "preset", "train")}
    owned = set(DERIVED) | shape_keys
    for key in _keys(sweep.train):
        if key in owned:
            why = "each run's steps and schedule" if key in DERIVED else "the shapes"
            problems.append(f"train: {key} is set by the sweep ({why}); remove it from train")
        elif key == "model" and any(s.get("preset") for s in sweep.shapes):
            problems.append("train: model= conflicts with the shapes' presets; name the preset in every shape")
        elif key.startswith(RESERVED_PREFIXES):
            problems.append(f"train: {key} belongs to the sweep (launcher, launcher_settings, dir); set it there")
    for i, shape in enumerate(sweep.shapes):
        for key in _keys(shape.get("train", [])):
            if key in DERIVED or key.startswith(RESERVED_PREFIXES + ("data.",)) or "." not in key:
                problems.append(f"shapes[{i}].train: {key} cannot be set per shape (dotted keys only, not "
                                f"data.*, which every run shares, nor {', '.join(DERIVED)})")
    return problems


def _run_problems(cfg, sweep: SweepConfig, label: str) -> list[str]:
    problems = []
    opt, tr = cfg.optim, cfg.trainer
    if opt.ramp_start_batch is not None or opt.gns_batch_ramp:
        problems.append(f"{label}: a batch-size ramp (optim.ramp_start_batch / optim.gns_batch_ramp) makes the "
                        "tokens per step vary; add optim.ramp_start_batch=null optim.gns_batch_ramp=false to train")
    if cfg.checkpoint.dir is not None:
        problems.append(f"{label}: checkpoint.dir={cfg.checkpoint.dir} would be shared by every run; leave it "
                        "null (each run's checkpoints then stay in its own directory)")
    if cfg.checkpoint.stop_after is not None:
        problems.append(f"{label}: checkpoint.stop_after would end the run before its budget; remove it")
    if tr.eval_iters < 1:
        problems.append(f"{label}: trainer.eval_iters={tr.eval_iters}: each run's final validation loss needs >= 1")
    p = cfg.parallel
    if sweep.launcher == "basic" and world_size(p) != 1:
        problems.append(f"{label}: parallel={p.name} needs {world_size(p)} processes, but Hydra's "
                        "basic launcher runs each point in one process: use parallel=single, or launcher: slurm")
    return problems


@dataclass
class Shape:
    """A shape's composed config and what every point of it shares."""

    name: str
    settings: dict  # as the sweep config gives it
    cfg: object  # the composed training config (without the derived keys)
    N: int
    flops_per_token: float
    batch_tokens: int


def _shape(composer: Composer, sweep: SweepConfig, i: int, settings: dict, problems: list[str]) -> Shape:
    from pretrain.scaling.__main__ import non_embedding_parameters

    name = shape_name(settings)
    cfg = composer.compose(name, _shape_yaml(settings), f"sweep shape {name} (shapes[{i}])")
    problems += _run_problems(cfg, sweep, f"shape {name}")
    n = non_embedding_parameters(OmegaConf.to_container(cfg.model, resolve=True))
    return Shape(name, settings, cfg, n, _flops_per_token(cfg, sweep.flops, n),
                 cfg.trainer.global_batch_size * cfg.trainer.seq_length)


def _point(sweep: SweepConfig, budget: float, shape: Shape, problems: list[str]) -> Optional[Point]:
    """The point, or None with the reason in ``problems`` when the budget buys too few steps."""
    target = budget / shape.flops_per_token
    steps = math.ceil(target / shape.batch_tokens)
    if steps < sweep.min_steps or target < shape.batch_tokens:
        floor = "one step" if target < shape.batch_tokens else f"min_steps={sweep.min_steps}"
        least = shape.flops_per_token * shape.batch_tokens * sweep.min_steps
        problems.append(f"C={budget:.3g} x shape {shape.name}: D = C / {'6N' if sweep.flops == '6ND' else 'F'} = "
                        f"{target:.4g} tokens, {target / shape.batch_tokens:.3g} global batches of "
                        f"{shape.batch_tokens} tokens (global_batch_size x seq_length), below {floor}: raise the "
                        f"budget to >= {least:.3g}, shrink the batch, or drop the shape")
        return None
    tokens = steps * shape.batch_tokens
    return Point(name=f"C{budget_label(budget)}-{shape.name}", budget=float(budget), shape=shape.name,
                 model={k: v for k, v in shape.settings.items() if k not in ("name", "train")}, N=shape.N,
                 flops_per_token=shape.flops_per_token, batch_tokens=shape.batch_tokens, D_target=target,
                 steps=steps, D=tokens, C=tokens * shape.flops_per_token,
                 warmup_tokens=round(sweep.warmup_fraction * tokens), decay_tokens=tokens,
                 train=list(shape.settings.get("train", [])))


def plan(sweep: SweepConfig) -> list[Point]:
    """Every point, budget-major, each composed and validated; a SweepConfigError lists every problem."""
    from pretrain.validate import validate

    problems = _base_problems(sweep)
    if problems:
        raise SweepConfigError(f"sweep {sweep.name}", problems)
    composer = Composer(sweep.train)
    points: list[Point] = []
    try:
        shapes = [_shape(composer, sweep, i, s, problems) for i, s in enumerate(sweep.shapes)]
        if problems:
            raise SweepConfigError(f"sweep {sweep.name}", problems)
        for budget in sweep.budgets:
            for shape in shapes:
                point = _point(sweep, budget, shape, problems)
                if point is None:
                    continue
                full = composer.compose(point.name, point_yaml(point, shape.settings), f"sweep point {point.name}")
                try:  # the world size is the launcher's to provide; the rest as pretrain.train checks it
                    validate(full, world_size(full.parallel))
                except UserError as err:  # a ConfigError listing the point's problems
                    problems.append(f"{point.name}: {err}")
                    continue
                _check_schedule(full, point)
                points.append(point)
    finally:
        composer.close()
    if problems:
        raise SweepConfigError(f"sweep {sweep.name}", problems)
    return points


def budget_label(budget: float) -> str:
    """3 significant digits, the exponent bare: 1e8, 2.5e11."""
    return re.sub(r"e([+-]?)0*(\d)", lambda m: "e" + m.group(1).replace("+", "") + m.group(2), f"{budget:.3g}")


def derived_settings(point: Point) -> dict:
    return {"trainer.max_steps": point.steps, "trainer.eval_interval": point.steps,
            "optim.warmup_tokens": point.warmup_tokens, "optim.decay_tokens": point.decay_tokens}


def point_yaml(point: Point, shape: dict) -> str:
    return _shape_yaml(shape, derived_settings(point))


def _check_schedule(cfg, point: Point) -> None:
    """The composed run's own schedule agrees with the point: its planned tokens, its decay end."""
    from pretrain.train.schedule import BatchSchedule

    planned = BatchSchedule.from_config(cfg).planned_tokens
    if planned != point.D or cfg.optim.decay_tokens != point.D:
        raise SweepConfigError(point.name, [f"the composed run plans {planned} tokens and decays over "
                                            f"{cfg.optim.decay_tokens}, not the point's {point.D}"])
