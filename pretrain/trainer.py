"""The training loop. Build order: validate -> groups -> data -> model -> init -> engine -> resume -> loop."""

from __future__ import annotations

import logging
import time
from pathlib import Path
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pretrain import checkpoint, compat, distributed
from pretrain.checkpoint import TrainState
from pretrain.engine import Batch, TrainEngine, apply_sequence_parallel_grad_sync, deepspeed_config
from pretrain.metrics import MetricsLog, plot_loss
from pretrain.model.gpt import apply_activation_checkpointing, build_model, canonical_parameters
from pretrain.model.init import apply_init, full_shape
from pretrain.optim import batch_size_at, build_optimizer, lr_at
from pretrain.validate import grad_accum_steps, validate

log = logging.getLogger(__name__)


def build_data(cfg: DictConfig, num_train: int, num_eval: int):
    """(train dataset, validation dataset or None, tokenizer vocab size). Collective."""
    seq, seed = cfg.trainer.seq_length, cfg.trainer.seed
    if cfg.data.name == "synthetic":
        from pretrain.synthetic import SyntheticDataset

        vocab = cfg.data.tokenizer.vocab_size
        return SyntheticDataset(vocab, seq, seed, num_train), SyntheticDataset(vocab, seq, seed + 1, num_eval), vocab
    from pretrain.data import build_datasets, prepare_data

    # Rank 0 runs (or reuses) the pipeline first; the others then find every stage cached.
    if dist.get_rank() == 0:
        prepared = prepare_data(cfg.data)
    dist.barrier()
    if dist.get_rank() != 0:
        prepared = prepare_data(cfg.data)
    train, valid, _ = build_datasets(prepared, cfg.data, seq_length=seq, num_samples=(num_train, num_eval, 0), seed=seed)
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


def planned_tokens(cfg: DictConfig) -> int:
    """Tokens the whole run will consume, following the batch ramp."""
    tokens, increment = 0, cfg.trainer.micro_batch_size * cfg.parallel.data
    for _ in range(cfg.trainer.max_steps):
        tokens += batch_size_at(tokens, cfg.optim, cfg.trainer.global_batch_size, increment) * cfg.trainer.seq_length
    return tokens


def count_parameters(model) -> int:
    """Parameters of the whole model (all TP shards and pipeline stages), each counted once. Collective."""
    local = {name: int(torch.Size(full_shape(p)).numel()) for name, p in canonical_parameters(model)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged = {}
    for part in gathered:
        merged.update(part)
    return sum(merged.values())


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)

    def run(self, keep_process_group: bool = False) -> TrainState:
        """Train on every launched rank. ``keep_process_group`` lets one process run several jobs."""
        cfg = self.cfg
        validate(cfg, distributed.world_size_from_env())
        distributed.init_distributed(cfg.parallel)
        try:
            return self._run()
        finally:
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

        num_train = planned_tokens(cfg) // tr.seq_length
        num_eval = tr.eval_iters * tr.micro_batch_size * cfg.parallel.data
        self.train_data, self.valid_data, vocab = build_data(cfg, num_train, max(num_eval, 1))
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = vocab
        elif cfg.model.vocab_size < vocab:
            raise ValueError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab} tokens; "
                "leave it null to take the tokenizer's size"
            )

        model = build_model(cfg.model, cfg.parallel, distributed.topology(cfg.parallel))
        apply_init(model, cfg.model, tr.seed)
        apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing, cfg.parallel.checkpoint_every)
        apply_sequence_parallel_grad_sync(model)
        self.num_params = count_parameters(model)
        optimizer = build_optimizer(model, cfg.optim)
        ds_config = deepspeed_config(cfg.parallel, tr, cfg.optim, grad_accum_steps(cfg))
        self.engine = TrainEngine(model, optimizer, ds_config, cfg.parallel, tap_local_grads=cfg.logging.local_grad_norm)

        self.ckpt_dir = cfg.checkpoint.dir or str(self.run_dir / "checkpoints")
        self.state = TrainState()
        resume = cfg.checkpoint.resume
        if resume != "never":
            source = self.ckpt_dir if resume == "auto" else resume
            loaded = checkpoint.resume(self.engine, source)
            if loaded is None and resume != "auto":
                raise FileNotFoundError(f"checkpoint.resume={resume}: no 'latest' checkpoint there")
            if loaded is not None:
                self.state = loaded
                if self.ranks.logs:
                    log.info("resumed from %s at step %d (%d tokens)", source, loaded.step, loaded.tokens)

    def _run(self) -> TrainState:
        self._setup()
        cfg, tr, state = self.cfg, self.cfg.trainer, self.state
        logs = self.ranks.logs
        metrics = None
        if logs:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            metrics = MetricsLog(self.run_dir)
            log.info(
                "model %s: %.2fM parameters | layout tp=%d pp=%d dp=%d zero=%d | %s | run dir %s",
                cfg.model.name, self.num_params / 1e6, cfg.parallel.tensor, cfg.parallel.pipeline,
                cfg.parallel.data, cfg.parallel.zero_stage, tr.precision, self.run_dir,
            )
        total_tokens = planned_tokens(cfg)
        increment = tr.micro_batch_size * cfg.parallel.data
        last_step = tr.max_steps if cfg.checkpoint.stop_after is None else min(tr.max_steps, cfg.checkpoint.stop_after)
        bar = tqdm(total=tr.max_steps, initial=state.step, disable=not (logs and tr.progress_bar), desc="train", dynamic_ncols=True)
        saved_at = None
        try:
            while state.step < last_step:
                batch = batch_size_at(state.tokens, cfg.optim, tr.global_batch_size, increment)
                self.engine.set_global_batch(batch)
                lr = lr_at(state.tokens + batch * tr.seq_length, cfg.optim, total_tokens)
                self.engine.set_lr(lr)
                t0 = time.perf_counter()
                batches = micro_batches(self.train_data, state.consumed_samples, batch, tr.micro_batch_size, self.ranks)
                t1 = time.perf_counter()
                result = self.engine.train_step(batches)
                t2 = time.perf_counter()
                state.step += 1
                state.consumed_samples += batch
                state.tokens += batch * tr.seq_length
                record = {
                    "step": state.step, "tokens": state.tokens, "loss": result.loss, "lr": lr,
                    "grad_norm": result.grad_norm, "batch_size": batch,
                    "tokens_per_s": batch * tr.seq_length / (t2 - t0),
                    "step_time_s": t2 - t0, "data_time_s": t1 - t0,
                }
                if result.local_grad_sq_norm is not None:
                    record["grad_norm_local"] = result.local_grad_sq_norm ** 0.5
                if tr.eval_interval and state.step % tr.eval_interval == 0 and self.valid_data is not None:
                    record["val_loss"] = self.evaluate()
                if logs and (state.step % cfg.logging.interval == 0 or "val_loss" in record):
                    metrics.write(record)
                bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
                if cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0:
                    checkpoint.save(self.engine, self.ckpt_dir, state, cfg.checkpoint.keep_last)
                    saved_at = state.step
            if cfg.checkpoint.save_final and saved_at != state.step and state.step > 0:
                checkpoint.save(self.engine, self.ckpt_dir, state, cfg.checkpoint.keep_last)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        if logs and cfg.logging.plot:
            plot_loss(self.run_dir)
        return state

    def evaluate(self) -> float:
        tr = self.cfg.trainer
        num = tr.eval_iters * tr.micro_batch_size * self.ranks.dp_size
        return self.engine.eval_loss(micro_batches(self.valid_data, 0, num, tr.micro_batch_size, self.ranks))
