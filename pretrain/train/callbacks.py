"""Logging callbacks, run on the logging rank only (global rank 0; every reported metric reaches it).

The trainer calls: ``on_train_start``, ``on_step`` (after each optimizer step, with that step's
metrics record, evaluation results included), ``on_checkpoint``, ``on_error`` and ``close``. A callback that
raises is reported once as a warning and switched off: logging never stops training.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path


log = logging.getLogger(__name__)


class Callback:
    def on_train_start(self, state) -> None: ...

    def on_step(self, record: dict) -> None: ...

    def on_checkpoint(self, path: str, step: int) -> None: ...

    def on_error(self, error: BaseException) -> None: ...

    def close(self) -> None: ...


class Callbacks:
    """Fans each event out; a failing callback warns once and is dropped."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def extend(self, callbacks: list[Callback]) -> None:
        self.callbacks.extend(callbacks)

    def _call(self, event: str, *args) -> None:
        for cb in list(self.callbacks):
            try:
                getattr(cb, event)(*args)
            except Exception as exc:  # noqa: BLE001 - logging must never stop training
                log.warning("%s.%s failed (%s: %s); it is switched off for the rest of the run",
                            type(cb).__name__, event, type(exc).__name__, exc)
                self.callbacks.remove(cb)

    # One method per event, so a misspelt event is an AttributeError rather than silently nothing.
    def on_train_start(self, state) -> None:
        self._call("on_train_start", state)

    def on_step(self, record: dict) -> None:
        self._call("on_step", record)

    def on_checkpoint(self, path: str, step: int) -> None:
        self._call("on_checkpoint", path, step)

    def on_error(self, error: BaseException) -> None:
        self._call("on_error", error)

    def close(self) -> None:
        self._call("close")


class MetricsFile(Callback):
    """One JSON object per logged step (and per evaluation: val_*, eval/<task>/<metric>) in <run dir>/metrics.jsonl.

    A resumed run appends; records past the step it resumed from (steps done after the last
    checkpoint by a run that was then killed) are dropped first, so each step appears once.
    """

    def __init__(self, run_dir: Path, interval: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.interval = interval
        self._file = None

    def on_train_start(self, state) -> None:
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= state.step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        self._file = open(self.path, "a", buffering=1)

    def on_step(self, record: dict) -> None:
        if record["step"] % self.interval == 0 or any(k.startswith(("val", "eval/")) for k in record):
            self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class ProgressBar(Callback):
    def __init__(self, total: int):
        from tqdm import tqdm

        self.total = total
        self.bar = tqdm(total=total, desc="train", dynamic_ncols=True)

    def on_train_start(self, state) -> None:
        self.bar.update(state.step)

    def on_step(self, record: dict) -> None:
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def wandb_mode() -> str:
    """online when credentials exist (WANDB_API_KEY or a netrc entry from `wandb login`), else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class WandbLogger(Callback):
    """Weights & Biases run in the run directory; metrics keyed by tokens seen so runs with
    different batch sizes line up. Offline runs upload later with `wandb sync <run dir>/wandb`."""

    def __init__(self, cfg, run_dir: Path):
        import wandb

        from pretrain.redact import redacted_config

        self.wandb = wandb
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_run_id"  # the same W&B run across resumes
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.logging.wandb_project,
            dir=str(run_dir),
            id=run_id,
            name=run_dir.name,
            resume="allow",
            mode=wandb_mode(),
            config=redacted_config(cfg.composed),  # no ${oc.env:...} values or secrets in the .wandb file
            tags=[f"model:{cfg.model.name}", f"data:{cfg.data.name}", f"parallel:{cfg.parallel.name}", cfg.trainer.precision],
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run.define_metric("tokens")
        self.run.define_metric("*", step_metric="tokens")

    def on_step(self, record: dict) -> None:
        self.run.log(record)

    def on_checkpoint(self, path: str, step: int) -> None:
        self.run.summary["last_checkpoint"] = path

    def on_error(self, error: BaseException) -> None:
        self.run.summary["error"] = f"{type(error).__name__}: {error}"

    def close(self) -> None:
        self.run.finish()


class Plots(Callback):
    """PNG plots (loss, learning rate, noise scale, throughput, task accuracy) when the run ends."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def close(self) -> None:
        from pretrain.plot import plot_runs

        plot_runs([self.run_dir], self.run_dir)


def start_logging(run) -> list[Callback]:
    """On the logging rank: the run's config.yaml, its summary line, warnings about odd settings, and
    the callbacks that log the run (each one that cannot start is left out with a warning)."""
    from omegaconf import OmegaConf

    from pretrain.redact import redacted_yaml

    cfg, run_dir = run.config, run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # ${oc.env:...} kept, secrets redacted; the vocabulary the data gave, so export and generate rebuild the model.
    resolved = OmegaConf.merge(cfg.composed, {"model": {"vocab_size": run.model_config.vocab_size}})
    (run_dir / "config.yaml").write_text(redacted_yaml(resolved))
    par = cfg.parallel
    log.info(
        "model %s: %.2fM parameters, %.3g FLOPs/token | layout tp=%d pp=%d dp=%d cp=%d zero=%d | %s | "
        "MFU against %.3g FLOP/s per device (%s) | run dir %s",
        cfg.model.name, run.num_params / 1e6, run.flops_per_token, par.tensor, par.pipeline, par.data,
        par.context, par.zero_stage, cfg.trainer.precision, run.peak_flops, run.peak_source, run_dir,
    )
    if 0 < cfg.trainer.loss_spike_factor <= 1:  # skips ordinary steps; the fault tests use it so
        log.warning("trainer.loss_spike_factor=%g skips every update whose loss is above the running mean; "
                    "use 0 (off) or a factor above 1, e.g. 3", cfg.trainer.loss_spike_factor)
    if cfg.optim.warmup_tokens > run.schedule.planned_tokens:  # a smoke run of a recipe's preset: allowed
        log.warning("optim.warmup_tokens=%d exceeds this run's %d tokens: the LR stays below its peak optim.lr=%g",
                    cfg.optim.warmup_tokens, run.schedule.planned_tokens, cfg.optim.lr)
    makers = [(MetricsFile, (run_dir, cfg.logging.interval))]
    if cfg.trainer.progress_bar:
        makers.append((ProgressBar, (cfg.trainer.max_steps,)))
    if cfg.logging.wandb:
        makers.append((WandbLogger, (cfg, run_dir)))
    if cfg.logging.plot:
        makers.append((Plots, (run_dir,)))
    callbacks: list[Callback] = []
    for cls, args in makers:
        try:
            callbacks.append(cls(*args))
        except Exception as exc:  # noqa: BLE001
            log.warning("%s could not start (%s: %s); continuing without it", cls.__name__, type(exc).__name__, exc)
    return callbacks
