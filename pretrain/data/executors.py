"""Where a stage's tasks run: ``data.executor`` = local (default), slurm or ray.

Each is a datatrove executor (per-task completion markers, task logs and stats under
``<cache>/_logs/<stage>/<key>/``, skipping tasks already completed). The driver (prepare_data)
runs stages in order, waits for each, and checks every task's result; outputs are the same
whichever executor ran them (``tasks.py``).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import List, Optional, Tuple

from pretrain.data.config import EXECUTORS, DataConfig
from pretrain.data.records import DataConfigError
from pretrain.data.stage_tasks import StageTasks
from pretrain.data.tasks import plan_text, prepare_partial, read_results


def _quiet_datatrove() -> None:
    """datatrove logs through loguru at INFO on stderr; keep its errors only (each task's full log is
    still written to its file, and the driver reports tasks that did not finish)."""
    import sys

    import datatrove.utils.logging  # noqa: F401  (adds its default handler when first imported)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="ERROR", format="{time:HH:mm:ss} | {level} | {message}")


# What the local executor's workers import; its forkserver loads them once, when the data job starts.
_WORKER_PRELOAD = ["pretrain.data.stage_tasks", "tokenizers", "datatrove.pipeline.tokens.megatron_tokenizer",
                   "datatrove.executor.local"]


def _forkserver():
    import multiprocess

    ctx = multiprocess.get_context("forkserver")
    ctx.set_forkserver_preload(_WORKER_PRELOAD)
    return ctx


def start_local_workers() -> None:
    """Start the local executor's forkserver now (returns at once), so that its imports overlap the
    stages before the first pool of workers is needed."""
    from multiprocess import forkserver

    _forkserver()
    forkserver.ensure_running()


def _local(cfg: DataConfig, step: StageTasks, tasks: int, logs: Path, workers: int):
    from datatrove.executor import LocalPipelineExecutor

    class Local(LocalPipelineExecutor):
        """datatrove's local executor without its multiprocessing Manager: a Manager's server
        process outlives a parent killed with SIGKILL, where pool workers see their pipes close and
        exit. Tasks run here one after another (one worker) or in a forkserver pool (never forked
        from this process, which may hold gloo, OpenMP and tokenizer threads)."""

        def _run_one(self, rank: int):
            # local_rank only sets the console level of the task's logger: errors only (its file has all).
            try:
                return self._run_for_rank(rank, 1)
            finally:
                _quiet_datatrove()  # the task's end put datatrove's default (DEBUG) handler back

        def run(self):
            ranks = self.get_incomplete_ranks(range(self.tasks))
            if not ranks:
                return
            self.save_executor_as_json()
            if self.workers == 1:
                for r in ranks:
                    self._run_one(r)
                return
            pool = _forkserver().Pool(min(self.workers, len(ranks)))
            try:
                for _ in pool.imap_unordered(self._run_one, ranks):
                    pass
                pool.close()  # workers exit on their own, releasing the queues' semaphores
            finally:
                pool.terminate()
                pool.join()

    return Local([step], tasks=tasks, workers=workers, logging_dir=str(logs))


class _Slurm:
    """A stage as one Slurm array job: array task r runs ``python -m pretrain.data.run_task SPEC r``,
    which rebuilds the stage's step from SPEC (JSON: no pickles) and runs task r through datatrove
    (its log, stats and completion marker). Only unfinished tasks are submitted. In a step of a
    Slurm chain (slurm_jobs.py, data.slurm.chain) the next step is submitted to run after the
    array and this one ends; otherwise the driver waits for the job to leave the queue. Then the
    driver checks every task's result."""

    def __init__(self, cfg: DataConfig, step: StageTasks, tasks: int, logs: Path):
        self.cfg, self.step, self.tasks, self.logs = cfg, step, tasks, logs

    def run(self) -> None:
        import time

        from pretrain.data import slurm_jobs
        from pretrain.data.run_task import write_spec

        ranks = [r for r in range(self.tasks) if not (self.logs / "completions" / f"{r:05d}").exists()]
        if not ranks:
            return
        (self.logs / "slurm").mkdir(parents=True, exist_ok=True)
        spec = write_spec(self.logs / "slurm" / "stage.json", self.step, self.tasks, str(self.logs))
        array = ",".join(str(r) for r in ranks) + (f"%{self.cfg.slurm.max_parallel}" if self.cfg.slurm.max_parallel else "")
        job = slurm_jobs.submit(self.cfg, self.logs / "slurm" / "stage.sbatch", f"pretrain-data-{self.step.stage}",
                     ["pretrain.data.run_task", str(spec), "$SLURM_ARRAY_TASK_ID"], array=array)
        if slurm_jobs.in_step():
            slurm_jobs.continue_after(self.cfg, job)  # raises: this step's part is done
        while slurm_jobs.queued([job]):
            time.sleep(self.cfg.slurm.poll_seconds)


_RAY_STARTED = False


def _ray(cfg: DataConfig, step: StageTasks, tasks: int, logs: Path, workers: int):
    global _RAY_STARTED
    try:
        import ray
    except ImportError:
        raise DataConfigError("data.executor=ray needs the ray package: pip install 'pretrain[ray]' (or ray>=2.60)") from None
    from datatrove.executor import RayPipelineExecutor

    if not ray.is_initialized():
        ray.init(address=cfg.ray.address, include_dashboard=False, log_to_driver=False, logging_level="error",
                 configure_logging=True)
        _RAY_STARTED = cfg.ray.address is None
    return RayPipelineExecutor([step], tasks=tasks, workers=workers, logging_dir=str(logs),
                               cpus_per_task=cfg.ray.cpus_per_task, mem_per_cpu_gb=cfg.ray.mem_per_cpu_gb)


def shutdown() -> None:
    """Stop the local Ray this process started (an existing cluster given by address stays up)."""
    global _RAY_STARTED
    if _RAY_STARTED:
        import ray

        ray.shutdown()
        _RAY_STARTED = False


def make_executor(cfg: DataConfig, step: StageTasks, tasks: int, logs: Path, workers: int):
    if cfg.executor == "local":
        return _local(cfg, step, tasks, logs, workers)
    if cfg.executor == "slurm":
        return _Slurm(cfg, step, tasks, logs)
    if cfg.executor == "ray":
        return _ray(cfg, step, tasks, logs, cfg.num_workers or tasks)
    raise DataConfigError(f"data.executor={cfg.executor!r}: choose one of {'|'.join(EXECUTORS)}")


def _watch(partial: Path, units: list, bar, done: set) -> None:
    """Advance the progress bar by the tasks whose results have appeared since the last look."""
    from pretrain.data.tasks import RESULTS, Chunk

    folder = partial / RESULTS
    if not folder.is_dir():
        return
    for f in sorted(folder.glob("[0-9]*.json")):
        r = int(f.stem)
        if r in done or r >= len(units):
            continue
        done.add(r)
        try:
            res = json.loads(f.read_text())
        except (OSError, ValueError):
            done.discard(r)  # being replaced: look again
            continue
        p = res.get("progress", {})
        unit = units[r]
        nbytes = unit.end - unit.start if isinstance(unit, Chunk) else p.get("bytes", 0)
        bar.add(p.get("docs", 0), nbytes, p.get("tokens", 0))


def _watching(partial: Path, units: list, bar, done: set, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        _watch(partial, units, bar, done)


def run_tasks(run, stage: str, key: str, units: list, context: dict, desc: str, total_bytes: Optional[int],
              tokens: bool = False) -> Tuple[Path, List[dict]]:
    """Run stage ``stage``'s tasks (one per unit) on the configured executor, in
    ``<cache>/<stage>/.<key>.partial``; returns that folder and every task's result."""
    cfg, root = run.cfg, run.root
    partial = root / stage / f".{key}.partial"
    logs = root / "_logs" / stage / key
    prepare_partial(partial, logs, plan_text(units, context))
    step = StageTasks(stage, units, context, str(partial))
    _quiet_datatrove()
    executor = make_executor(cfg, step, len(units), logs, run.workers(len(units)))
    with run.progress(desc, total_bytes, tokens) as bar:
        done: set = set()
        stop = threading.Event()
        watcher = threading.Thread(target=_watching, args=(partial, units, bar, done, stop), daemon=True) if bar.enabled else None
        if watcher:
            watcher.start()
        try:
            executor.run()
        finally:
            stop.set()
            if watcher:
                watcher.join()
        if bar.enabled:
            _watch(partial, units, bar, done)
    results = read_results(partial, len(units))
    failed = [(r, res["error"]) for r, res in enumerate(results) if res and "error" in res]
    if failed:
        for r, _ in failed:  # so that the next run does these tasks again
            (logs / "completions" / f"{r:05d}").unlink(missing_ok=True)
        raise DataConfigError(failed[0][1]["message"])
    missing = [r for r, res in enumerate(results) if res is None]
    if missing:
        raise RuntimeError(
            f"data stage {stage}: {len(missing)} of {len(units)} tasks did not finish (first: task {missing[0]}); "
            f"their logs are in {logs / 'logs'}; run the job again to redo only those"
        )
    return partial, results
