"""The training loop. Build order: validate -> groups -> data -> model -> init -> engine -> resume -> loop."""

from __future__ import annotations

import logging
import math
import resource
import time
from pathlib import Path
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from pretrain.engine import compat
from pretrain.checkpoint import store as checkpoint
from pretrain.engine import groups as distributed
from pretrain.train import faults
from pretrain.checkpoint import manifest
from pretrain.checkpoint.store import TrainState
from pretrain.errors import CheckpointError, UserError
from pretrain.engine.core import Batch, TrainEngine, apply_sequence_parallel_grad_sync, deepspeed_config
from pretrain.train.callbacks import Callbacks, build_callbacks
from pretrain.flops import model_flops_per_token, peak_flops
from pretrain.train.gns import NoiseScale
from pretrain.model.gpt import apply_activation_checkpointing, build_model, padded_vocab_size
from pretrain.model.init import apply_init
from pretrain.train.optim import batch_size_at, build_optimizer, lr_at
from pretrain.validate import ConfigError, grad_accum_steps, planned_tokens, validate

log = logging.getLogger(__name__)


def build_data(cfg: DictConfig, num_train: int, num_eval: int):
    """(train dataset, {source: validation dataset}, tokenizer vocab size). Collective.

    Validation sets are built only when evaluation is on (trainer.eval_interval > 0).
    """
    seq, seed = cfg.trainer.seq_length, cfg.trainer.seed
    evaluate = cfg.trainer.eval_interval > 0
    if cfg.data.name == "synthetic":
        from pretrain.synthetic import SyntheticDataset

        vocab = cfg.data.tokenizer.vocab_size
        valid = {"synthetic": SyntheticDataset(vocab, seq, seed + 1, num_eval)} if evaluate else {}
        return SyntheticDataset(vocab, seq, seed, num_train), valid, vocab
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
    return train, valid, prepared.vocab_size


def micro_batches(dataset, first_sample: int, global_batch: int, micro: int, ranks: distributed.Ranks) -> list[Batch]:
    """This DP rank's micro-batches for a step consuming global samples [first, first + global_batch).

    Micro-step j covers samples first + j*micro*dp ... ; DP rank r takes its ``micro`` of them.
    """
    batches = []
    device = compat.device()
    for start in range(first_sample, first_sample + global_batch, micro * ranks.dp_size):
        lo = start + ranks.dp * micro
        samples = [dataset[i] for i in range(lo, lo + micro)]
        tokens = torch.stack([torch.as_tensor(s["tokens"], dtype=torch.long) for s in samples]).to(device)
        labels = torch.stack([torch.as_tensor(s["labels"], dtype=torch.long) for s in samples]).to(device)
        batches.append((tokens, labels))
    return batches


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)

    def run(self, keep_process_group: bool = False) -> TrainState:
        """Train on every launched rank. ``keep_process_group`` lets one process run several jobs."""
        cfg = self.cfg
        validate(cfg, distributed.world_size_from_env())
        distributed.init_distributed(cfg.parallel)
        self.stop_request = faults.StopRequest().install()
        try:
            return self._run()
        finally:
            self.stop_request.uninstall()
            distributed.shutdown(keep_default_group=keep_process_group)

    def _setup(self):
        cfg = self.cfg
        tr = cfg.trainer
        self.ranks = distributed.ranks()
        # Every rank writes under rank 0's run dir (separately launched processes may resolve
        # Hydra's timestamped default differently).
        box = [str(self.run_dir)]
        dist.broadcast_object_list(box, src=0)
        self.run_dir = Path(box[0])

        torch.manual_seed(tr.seed)
        compat.seed_model_parallel_rng(tr.seed)
        if tr.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.total_tokens = planned_tokens(cfg)
        num_train = self.total_tokens // tr.seq_length
        num_eval = tr.eval_iters * tr.micro_batch_size * cfg.parallel.data
        self.train_data, self.valid_data, vocab = build_data(cfg, num_train, max(num_eval, 1))
        self.gns = NoiseScale()
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = vocab
        elif cfg.model.vocab_size < vocab:
            raise ConfigError([
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab} tokens; "
                "leave it null to take the tokenizer's size"
            ])

        model = build_model(cfg.model, cfg.parallel, distributed.topology(cfg.parallel))
        apply_init(model, cfg.model, tr.seed)
        if cfg.model.init_from:
            from pretrain.interop.import_hf import apply_init_from

            apply_init_from(model, cfg.model, cfg.model.init_from)
        apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing, cfg.parallel.checkpoint_every)
        apply_sequence_parallel_grad_sync(model)
        optimizer = build_optimizer(model, cfg.optim)
        self.gate = faults.UpdateGate(optimizer, tr.loss_spike_factor)  # before DeepSpeed wraps the optimizer
        ds_config = deepspeed_config(cfg.parallel, tr, cfg.optim, grad_accum_steps(cfg))
        self.engine = TrainEngine(model, optimizer, ds_config, cfg.parallel, tap_local_grads=cfg.logging.gns)
        self.num_params = sum(math.prod(shape) for shape in self.engine.shapes.values())
        self.flops_per_token = model_flops_per_token(cfg.model, tr.seq_length, padded_vocab_size(cfg.model))
        self.peak_flops, self.peak_source = peak_flops(tr.precision)

        self.gate.attach(self.engine)
        self.ckpt_dir = cfg.checkpoint.dir or str(self.run_dir / "checkpoints")
        self.state = TrainState()
        resume = cfg.checkpoint.resume
        if resume != "never":
            source, tag = (self.ckpt_dir, None) if resume == "auto" else manifest.resolve(resume)
            loaded = checkpoint.resume(self.engine, str(source), tag)
            if loaded is None and resume != "auto":
                raise CheckpointError(f"checkpoint.resume={resume}: no checkpoint (step* folder) there")
            if loaded is not None:
                self.state = loaded
                if loaded.noise_scale:
                    self.gns.load_state_dict(loaded.noise_scale)
                if self.ranks.logs:
                    log.info("resumed from %s at step %d (%d tokens)", source, loaded.step, loaded.tokens)
        self.gate.reference = self.state.loss_average

    def _start_logging(self) -> Callbacks:
        cfg = self.cfg
        if not self.ranks.logs:
            return Callbacks([])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from pretrain.redact import redacted_yaml

        (self.run_dir / "config.yaml").write_text(redacted_yaml(cfg))  # ${oc.env:...} kept, secrets redacted
        log.info(
            "model %s: %.2fM parameters, %.3g FLOPs/token | layout tp=%d pp=%d dp=%d zero=%d | %s | "
            "MFU against %.3g FLOP/s per device (%s) | run dir %s",
            cfg.model.name, self.num_params / 1e6, self.flops_per_token, cfg.parallel.tensor, cfg.parallel.pipeline,
            cfg.parallel.data, cfg.parallel.zero_stage, cfg.trainer.precision, self.peak_flops, self.peak_source,
            self.run_dir,
        )
        if 0 < cfg.trainer.loss_spike_factor <= 1:  # skips ordinary steps; the fault tests use it so
            log.warning("trainer.loss_spike_factor=%g skips every update whose loss is above the running mean; "
                        "use 0 (off) or a factor above 1, e.g. 3", cfg.trainer.loss_spike_factor)
        if cfg.optim.warmup_tokens > self.total_tokens:  # a smoke run of a recipe's preset: allowed
            log.warning("optim.warmup_tokens=%d exceeds this run's %d tokens: the LR stays below its peak optim.lr=%g",
                        cfg.optim.warmup_tokens, self.total_tokens, cfg.optim.lr)
        return build_callbacks(cfg, self.run_dir, cfg.trainer.max_steps)

    def _batch_size(self) -> int:
        """This step's global batch (sequences): the token ramp, or the measured critical batch."""
        cfg, tr = self.cfg, self.cfg.trainer
        increment = tr.micro_batch_size * cfg.parallel.data
        batch = batch_size_at(self.state.tokens, cfg.optim, tr.global_batch_size, increment)
        critical = self.gns_critical_batch
        if cfg.logging.gns_batch_ramp and critical is not None and self.gns.updates >= cfg.logging.gns_ramp_warmup:
            low = cfg.optim.ramp_start_batch or increment
            batch = max(low, min(tr.global_batch_size, int(critical) // increment * increment))
        return batch

    def _step_metrics(self, result, batch: int, seconds: float) -> dict:
        """Throughput, MFU, memory, noise scale. Collective (every rank calls it every step)."""
        tr = self.cfg.trainer
        tokens_per_s = batch * tr.seq_length / seconds
        achieved = tokens_per_s * self.flops_per_token
        world = dist.get_world_size()
        metrics = {
            "tokens_per_s": tokens_per_s,
            "model_tflops_per_s": achieved / 1e12,
            # MFU per device: the job's model FLOP/s over world_size devices' peak.
            "mfu": achieved / (self.peak_flops * world),
            "peak_memory_gb": peak_memory_gb(),
        }
        highest = torch.tensor(metrics["peak_memory_gb"], dtype=torch.float64, device=compat.device())
        dist.all_reduce(highest, op=dist.ReduceOp.MAX)
        metrics["peak_memory_gb_max_rank"] = float(highest)
        if result.fwd_bwd_s is not None:
            metrics["fwd_bwd_time_s"] = result.fwd_bwd_s
            metrics["optimizer_time_s"] = result.optimizer_s
        if result.local_grad_sq_norm is not None:
            metrics["grad_norm_local"] = result.local_grad_sq_norm ** 0.5
        if result.small_batch is not None and result.small_batch < batch:
            metrics.update(self.gns.update(result.small_batch_sq_norm, result.grad_norm**2, result.small_batch, batch, tr.seq_length))
            self.state.noise_scale = self.gns.state_dict()
            self.gns_critical_batch = metrics.get("gns/simple")
        return metrics

    def _run(self) -> TrainState:
        self._setup()
        cfg, tr, state = self.cfg, self.cfg.trainer, self.state
        callbacks = self._start_logging()
        last_step = tr.max_steps if cfg.checkpoint.stop_after is None else min(tr.max_steps, cfg.checkpoint.stop_after)
        self.gns_critical_batch = None
        saved_at = None
        try:
            callbacks.on_train_start(state)
            while state.step < last_step:
                batch = self._batch_size()
                self.engine.set_global_batch(batch)
                lr = lr_at(state.tokens + batch * tr.seq_length, cfg.optim, self.total_tokens)
                self.engine.set_lr(lr)
                t0 = time.perf_counter()
                batches = micro_batches(self.train_data, state.consumed_samples, batch, tr.micro_batch_size, self.ranks)
                t1 = time.perf_counter()
                result = self.engine.train_step(batches)
                self._count_skip(self.gate.take_result(), result.loss)
                t2 = time.perf_counter()
                state.step += 1
                state.consumed_samples += batch
                state.tokens += batch * tr.seq_length
                record = {
                    "step": state.step, "tokens": state.tokens, "loss": result.loss, "lr": lr,
                    "grad_norm": result.grad_norm, "batch_size": batch,
                    "step_time_s": t2 - t0, "data_time_s": t1 - t0, "skipped_steps": state.skipped_steps,
                }
                record.update(self._step_metrics(result, batch, t2 - t0))
                if tr.eval_interval and state.step % tr.eval_interval == 0 and self.valid_data:
                    record.update(self.evaluate())
                callbacks.on_step(record)
                if cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0:
                    callbacks.on_checkpoint(checkpoint.save(self.engine, self.ckpt_dir, state, cfg.checkpoint.keep_last), state.step)
                    saved_at = state.step
                faults.planted_step_delay()
                stop = self._stop_reason()
                if stop is not None:
                    if saved_at != state.step:
                        callbacks.on_checkpoint(checkpoint.save(self.engine, self.ckpt_dir, state, cfg.checkpoint.keep_last), state.step)
                    if self.ranks.logs:
                        log.error("%s; state saved in %s at step %d", stop[1], self.ckpt_dir, state.step)
                    raise SystemExit(stop[0])
            if cfg.checkpoint.save_final and saved_at != state.step and state.step > 0:
                callbacks.on_checkpoint(checkpoint.save(self.engine, self.ckpt_dir, state, cfg.checkpoint.keep_last), state.step)
        except BaseException as error:
            callbacks.on_error(error)
            raise
        finally:
            callbacks.close()
        return state

    def _count_skip(self, reason, loss: float) -> None:
        """Count an update the gate skipped, or fold an applied step's loss into the running mean."""
        state = self.state
        if reason is None:
            state.consecutive_skips = 0
            state.loss_average = faults.update_running_mean(state.loss_average, loss)
            self.gate.reference = state.loss_average
            return
        state.skipped_steps += 1
        state.consecutive_skips += 1
        if self.ranks.logs:
            log.warning("step %d: update skipped (%s); %d in a row, %d in total",
                        state.step + 1, reason, state.consecutive_skips, state.skipped_steps)

    def _stop_reason(self):
        """(exit code, message) if the run must stop now, else None. Collective: every rank, every step."""
        received = self.stop_request.agreed()
        if received is not None:
            return faults.EXIT_STOPPED, f"received {received}: stopping; run again to resume"
        limit = self.cfg.trainer.max_consecutive_skips
        if limit and self.state.consecutive_skips >= limit:
            return faults.EXIT_DIVERGED, (
                f"{self.state.consecutive_skips} updates in a row were skipped for a bad loss "
                f"(trainer.max_consecutive_skips={limit}); lower the learning rate or check the data")
        return None

    def evaluate(self) -> dict:
        """Validation loss and perplexity per source and their mean. Collective."""
        tr = self.cfg.trainer
        num = tr.eval_iters * tr.micro_batch_size * self.ranks.dp_size
        metrics = {}
        for source, dataset in self.valid_data.items():
            loss = self.engine.eval_loss(micro_batches(dataset, 0, num, tr.micro_batch_size, self.ranks))
            metrics[f"val/{source}/loss"] = loss
            metrics[f"val/{source}/ppl"] = math.exp(min(loss, 50.0))
        losses = [v for k, v in metrics.items() if k.endswith("/loss")]
        metrics["val_loss"] = sum(losses) / len(losses)
        metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        return metrics


def peak_memory_gb() -> float:
    """This process's peak memory: allocated CUDA memory on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
