"""The training loop: one optimizer step after another, until the last step or a reason to stop.

It reads no config: the batch schedule decides each step's batch and learning rate, the engine runs
it, the hooks (``hooks``) measure, guard, stop and checkpoint, the task evaluator
(``pretrain.evaluate.inloop``) scores downstream tasks on rank 0, and the rank-0 callbacks log.
"""

from __future__ import annotations

import logging
import math
import time

from pretrain.checkpoint.store import TrainState
from pretrain.train.build import Run

log = logging.getLogger(__name__)


def train(run: Run) -> TrainState:
    """Train from ``run.state`` to ``run.last_step`` on every rank; SystemExit on a stop request."""
    state, hooks, engine = run.state, run.hooks, run.engine
    run.callbacks.on_train_start(state)
    try:
        tasks = task_evaluator(run)
        while state.step < run.last_step:
            plan = run.schedule.step(state.step, state.tokens, hooks.noise.critical, hooks.noise.estimates)
            engine.set_global_batch(plan.batch)
            engine.set_lr(plan.lr)
            start = time.perf_counter()
            batches = run.batches(run.train_data, state.consumed_samples, plan.batch)
            loaded = time.perf_counter()
            result = engine.train_step(batches)
            state.step, state.consumed_samples = state.step + 1, state.consumed_samples + plan.batch
            state.tokens += plan.batch * run.schedule.seq_length
            record = {"step": state.step, "tokens": state.tokens, "loss": result.loss, "lr": plan.lr,
                      "grad_norm": result.grad_norm, "batch_size": plan.batch,
                      "step_time_s": time.perf_counter() - start, "data_time_s": loaded - start}
            for hook in hooks.every_step:
                hook.after_step(state, result, record)
            record.update(evaluate(run, state.step))
            record.update(tasks.evaluate(engine.module, state.step))
            run.callbacks.on_step(record)
            if hooks.faults is not None:
                hooks.faults.delay()
            stop = hooks.stop.reason(state)
            hooks.checkpoint.after_step(state, stopping=stop is not None)
            if stop is not None:
                if run.ranks.logs:
                    log.error("%s; state saved in %s at step %d", stop[1], hooks.checkpoint.directory, state.step)
                raise SystemExit(stop[0])
        hooks.checkpoint.at_end(state)
    except BaseException as error:
        run.callbacks.on_error(error)
        raise
    finally:
        run.callbacks.close()
    return state


def task_evaluator(run: Run):
    """``trainer.eval_tasks`` every ``trainer.eval_tasks_interval`` steps (0: every ``eval_interval``)."""
    from pretrain.evaluate.inloop import TaskEvaluator

    tr = run.config.trainer
    return TaskEvaluator(run.config, run.model_config, tr.eval_tasks_interval or tr.eval_interval)


def evaluate(run: Run, step: int) -> dict:
    """Validation loss and perplexity per source and their mean, every ``trainer.eval_interval`` steps
    (else nothing). Collective."""
    tr = run.config.trainer
    if not (tr.eval_interval and step % tr.eval_interval == 0 and run.valid_data):
        return {}
    count = tr.eval_iters * tr.micro_batch_size * run.ranks.dp_size
    metrics = {}
    for source, dataset in run.valid_data.items():
        loss = run.engine.eval_loss(run.batches(dataset, 0, count))
        metrics[f"val/{source}/loss"] = loss
        metrics[f"val/{source}/ppl"] = math.exp(min(loss, 50.0))
    losses = [v for k, v in metrics.items() if k.endswith("/loss")]
    metrics["val_loss"] = sum(losses) / len(losses)
    metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
    return metrics
