"""The one build order of a run: groups -> data -> model -> init -> engine -> hooks -> resume.

``build_run`` returns the pieces (``Run``); ``loop.train`` runs them, ``bench.step`` times the engine
it builds, and ``build_model`` (the model half of the order) also serves the inference tools. Nothing
here reads the config after building, and nothing writes to it: derived values (the vocabulary, the
batch schedule) are computed objects beside it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from pretrain.checkpoint import manifest, store
from pretrain.checkpoint.store import TrainState
from pretrain.config import ModelConfig, RunConfig, seal
from pretrain.engine import compat, groups
from pretrain.engine.core import Batch, TrainEngine, apply_sequence_parallel_grad_sync, deepspeed_config
from pretrain.errors import CheckpointError, UserError
from pretrain.flops import model_flops_per_token, peak_flops
from pretrain.model.compile import compile_blocks
from pretrain.model.gpt import apply_activation_checkpointing, padded_vocab_size
from pretrain.model.init import apply_init
from pretrain.train import injection, rundir
from pretrain.train.callbacks import Callbacks
from pretrain.train.faults import StopRequest
from pretrain.train.hooks import CheckpointHook, LossGuardHook, NoiseScaleHook, StopHook, Throughput
from pretrain.train.optim import build_optimizer
from pretrain.train.schedule import BatchSchedule
from pretrain.validate import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Hooks:
    """The per-step hooks in the order they run, and the two that end a step."""

    every_step: list  # Throughput, NoiseScaleHook, LossGuardHook (train.hooks)
    noise: NoiseScaleHook
    stop: StopHook
    checkpoint: CheckpointHook
    faults: Optional[injection.Faults] = None

    @property
    def stateful(self) -> list:
        """The hooks whose state a checkpoint carries."""
        return self.checkpoint.stateful


@dataclass
class Run:
    """Everything a training run needs, built in order on every rank."""

    config: RunConfig
    model_config: ModelConfig  # the configured model with the tokenizer's vocabulary
    run_dir: Path
    ranks: groups.Ranks
    schedule: BatchSchedule
    train_data: object
    valid_data: dict
    engine: TrainEngine
    state: TrainState
    hooks: Hooks
    callbacks: Callbacks
    num_params: int
    flops_per_token: int
    peak_flops: float
    peak_source: str

    @property
    def last_step(self) -> int:
        stop_after = self.config.checkpoint.stop_after
        steps = self.config.trainer.max_steps
        return steps if stop_after is None else min(steps, stop_after)

    def batches(self, dataset, first_sample: int, count: int) -> list[Batch]:
        """This DP rank's micro-batches of global samples [first, first + count).

        Micro-step j covers samples first + j*micro*dp ... ; DP rank r takes its ``micro`` of them.
        """
        micro, dp, device = self.config.trainer.micro_batch_size, self.ranks.dp_size, compat.device()
        batches = []
        for start in range(first_sample, first_sample + count, micro * dp):
            lo = start + self.ranks.dp * micro
            samples = [dataset[i] for i in range(lo, lo + micro)]
            tokens = torch.stack([torch.as_tensor(s["tokens"], dtype=torch.long) for s in samples]).to(device)
            labels = torch.stack([torch.as_tensor(s["labels"], dtype=torch.long) for s in samples]).to(device)
            batches.append((tokens, labels))
        return batches


def start_groups(cfg: RunConfig, run_dir: Path) -> tuple[groups.Ranks, Path]:
    """Process groups and seeds; every rank adopts rank 0's run directory (separately launched
    processes may resolve Hydra's timestamped default differently)."""
    groups.init_distributed(cfg.parallel)
    box = [str(run_dir)]
    dist.broadcast_object_list(box, src=0)
    torch.manual_seed(cfg.trainer.seed)
    compat.seed_model_parallel_rng(cfg.trainer.seed)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return groups.ranks(), Path(box[0])


def build_data(cfg: RunConfig, num_train: int, num_eval: int):
    """(train dataset, {source: validation dataset}, tokenizer vocab size, end-of-text id or None
    for synthetic tokens). Collective.

    Validation sets are built only when evaluation is on (trainer.eval_interval > 0).
    """
    seq, seed = cfg.trainer.seq_length, cfg.trainer.seed
    evaluate = cfg.trainer.eval_interval > 0
    if cfg.data.name == "synthetic":
        from pretrain.synthetic import SyntheticDataset

        vocab = cfg.data.tokenizer.vocab_size
        valid = {"synthetic": SyntheticDataset(vocab, seq, seed + 1, num_eval)} if evaluate else {}
        return SyntheticDataset(vocab, seq, seed, num_train), valid, vocab, None
    from pretrain.data import DataConfigError, build_datasets, build_eval_datasets, prepare_data

    # Rank 0 runs (or reuses) the pipeline first; the others then find every stage cached. A bad
    # record found on the way (on_bad_record=error) stops every rank with rank 0's message.
    failure = None
    if dist.get_rank() == 0:
        try:
            prepared = prepare_data(cfg.data)
        except UserError as err:
            failure = err
    box = [None if failure is None else str(failure)]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0] is not None:
        raise DataConfigError(box[0])
    if dist.get_rank() != 0:
        prepared = prepare_data(cfg.data)
    train, _, _ = build_datasets(prepared, cfg.data, seq_length=seq, num_samples=(num_train, 0, 0), seed=seed)
    valid = build_eval_datasets(prepared, cfg.data, seq, seed, split="valid", num_samples=num_eval) if evaluate else {}
    return train, valid, prepared.vocab_size, prepared.eod_id


def with_vocab(model: ModelConfig, vocab: int, eod: Optional[int] = None) -> ModelConfig:
    """The model config with the tokenizer's vocabulary, and its end-of-text id where document
    masking wants one and none was given (a new, sealed object)."""
    if model.vocab_size is not None and model.vocab_size < vocab:
        raise ConfigError([f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's {vocab} tokens; "
                           "leave it null to take the tokenizer's size"])
    changes = {"vocab_size": vocab} if model.vocab_size is None else {}
    if model.document_mask and model.eod_token_id is None and eod is not None:
        changes["eod_token_id"] = eod
    return seal(replace(model, **changes)) if changes else model


def build_model(cfg: RunConfig, model_cfg: ModelConfig, faults=None, next_step=None) -> nn.Module:
    """This rank's part of the model, initialised (seeded, or from ``model.init_from``), before the engine."""
    from pretrain.engine.pipeline import build_model as build_layers

    model = build_layers(model_cfg, cfg.parallel)
    apply_init(model, model_cfg, cfg.trainer.seed)
    if model_cfg.init_from:
        from pretrain.interop.import_hf import apply_init_from

        apply_init_from(model, model_cfg, model_cfg.init_from)
    apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing, cfg.parallel.checkpoint_every)
    apply_sequence_parallel_grad_sync(model)
    compile_blocks(model, model_cfg.compile)
    if faults is not None:
        faults.install_nan_losses(model, next_step)  # before the engine's own loss hook
    return model


def build_run(cfg: RunConfig, run_dir: Path, stop_request: Optional[StopRequest] = None, logging_on: bool = True) -> Run:
    """Build every piece of a run on every rank, resuming from ``checkpoint.resume``. Collective."""
    tr = cfg.trainer
    ranks, run_dir = start_groups(cfg, run_dir)
    rundir.check_run_dirs(run_dir, cfg.checkpoint.dir)  # multi-node: one directory every node sees
    schedule = BatchSchedule.from_config(cfg)
    num_eval = tr.eval_iters * tr.micro_batch_size * cfg.parallel.data
    train_data, valid_data, vocab, eod = build_data(cfg, schedule.train_samples, max(num_eval, 1))
    model_cfg = with_vocab(cfg.model, vocab, eod)

    state = TrainState()
    faults = injection.planned()
    model = build_model(cfg, model_cfg, faults, next_step=lambda: state.step + 1)
    guard = LossGuardHook(tr.loss_spike_factor, ranks.logs)
    ds_config = deepspeed_config(cfg.parallel, tr, cfg.optim, schedule.accumulation)
    engine = TrainEngine(model, build_optimizer(model, cfg.optim), ds_config, cfg.parallel,
                         tap_local_grads=cfg.logging.gns, judge=guard.judge)
    flops_per_token = model_flops_per_token(model_cfg, tr.seq_length, padded_vocab_size(model_cfg))
    peak, peak_source = peak_flops(tr.precision)

    noise = NoiseScaleHook(tr.seq_length)
    every_step = [Throughput(tr.seq_length, flops_per_token, peak), noise, guard]
    callbacks = Callbacks([])
    ckpt = cfg.checkpoint
    checkpoint = CheckpointHook(engine, ckpt.dir or str(run_dir / "checkpoints"), ckpt.interval, ckpt.keep_last,
                                ckpt.save_final, [noise, guard], callbacks,
                                before_commit=faults.crash_if_planted if faults else None)
    hooks = Hooks(every_step, noise, StopHook(stop_request or StopRequest(), tr.max_consecutive_skips), checkpoint, faults)
    state = resume(cfg, engine, hooks, checkpoint.directory, state, ranks)
    num_params = sum(math.prod(shape) for shape in engine.shapes.values())
    run = Run(cfg, model_cfg, run_dir, ranks, schedule, train_data, valid_data, engine, state, hooks, callbacks,
              num_params, flops_per_token, peak, peak_source)
    if logging_on and ranks.logs:
        from pretrain.train.callbacks import start_logging

        callbacks.extend(start_logging(run))
    return run


def resume(cfg: RunConfig, engine: TrainEngine, hooks: Hooks, directory: str, state: TrainState, ranks) -> TrainState:
    """``checkpoint.resume``: auto (the newest intact checkpoint in ``directory``, if any), never, or a path.

    Fills ``state`` in place (hooks hold a reference to it) and loads each hook's saved state."""
    resume_from = cfg.checkpoint.resume
    if resume_from == "never":
        return state
    source, tag = (directory, None) if resume_from == "auto" else manifest.resolve(resume_from)
    loaded = store.resume(engine, str(source), tag)
    if loaded is None:
        if resume_from != "auto":
            raise CheckpointError(f"checkpoint.resume={resume_from}: no checkpoint (step* folder) there")
        return state
    state.__dict__.update(loaded.__dict__)
    for hook in hooks.stateful:
        hook.load_state_dict(state.hooks.get(hook.name, {}))
    if ranks.logs:
        log.info("resumed from %s at step %d (%d tokens)", source, state.step, state.tokens)
    return state
