"""The data job's Slurm jobs: submitting them, and with data.slurm.chain (the default) the data
job as a chain of jobs.

A stage's tasks are planned from the previous stage's published output, and dedup's greedy pass
and each stage's checks and publishing run in the driver; so the driver itself runs as Slurm jobs.
A *step* (``python -m pretrain.data.slurm_chain FOLDER``, one task) runs prepare_data on the
config in FOLDER: stages already published are reused, and the first stage with unfinished tasks
submits its array job, then the next step with ``--dependency=afterany:<array>``, and the step
ends. The next step checks that stage's results, publishes it and goes on, and so on to the
shards. Slurm orders the stages: nothing has to stay up on the login node between them.

The calling process (prepare_data) submits the first step, or attaches to a chain of the same
data job still in the queue, and waits for the shards. A step's error (a DataConfigError or a task
that did not finish) is written to FOLDER/error.json and raised by the caller with the same
message. Killing the caller leaves the chain running (FOLDER/jobs.jsonl lists its jobs, for
``scancel``); running it again attaches to it, or resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List, Optional

from pretrain.data.config import DataConfig
from pretrain.data.records import DataConfigError

_STEP: Optional[Path] = None  # in a step: its chain folder


class Continued(Exception):
    """This step submitted the next one: its part of the chain is done."""


def in_step() -> bool:
    return _STEP is not None


def start_step(chain: Path) -> None:
    """This process is a step of the chain in ``chain`` (slurm_chain.main)."""
    global _STEP
    _STEP = chain


def folder(root: Path, shards_key: str) -> Path:
    return root / "_logs" / "chain" / shards_key


def _jobs(chain: Path) -> List[dict]:
    path = chain / "jobs.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _submit_step(cfg: DataConfig, chain: Path, after: Optional[str]) -> str:
    n = sum(1 for j in _jobs(chain) if j["kind"] == "step")
    job = submit(cfg, chain / f"step-{n:03d}.sbatch", "pretrain-data-driver", ["pretrain.data.slurm_chain", str(chain)],
                 after=after)
    with open(chain / "jobs.jsonl", "a") as f:
        if after:
            f.write(json.dumps({"kind": "array", "job": after}) + "\n")
        f.write(json.dumps({"kind": "step", "job": job, "after": after}) + "\n")
    return job


def continue_after(cfg: DataConfig, array_job: str) -> None:
    """In a step: submit the next step to run after ``array_job``, and end this one."""
    _submit_step(cfg, _STEP, array_job)
    raise Continued()


def run(cfg: DataConfig, cfg_dict: dict, chain: Path, done: Path, console) -> None:
    """The caller's side: start the chain (or attach to a live one) and wait until ``done`` (the
    shards folder) is published; raise a step's error."""
    from pretrain.data import cache

    chain.mkdir(parents=True, exist_ok=True)
    live = [j["job"] for j in _jobs(chain)[-2:]]
    if live and queued(live):
        console.print(f"data: attaching to the Slurm chain in the queue (jobs {', '.join(live)}; {chain})")
    else:
        (chain / "error.json").unlink(missing_ok=True)
        tmp = chain / f".config.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(cfg_dict))
        os.replace(tmp, chain / "config.json")
        job = _submit_step(cfg, chain, None)
        console.print(f"data: Slurm chain started, first step job {job}; each stage's array job is followed by "
                      f"a driver step that depends on it; steps' logs in {chain}")
    try:
        _wait(cfg, chain, done)
    except KeyboardInterrupt:
        jobs = " ".join(j["job"] for j in _jobs(chain)[-2:])
        console.print(f"data: the Slurm chain goes on without this process (scancel {jobs} stops it; running "
                      f"again attaches to it)")
        raise


def _wait(cfg: DataConfig, chain: Path, done: Path) -> None:
    from pretrain.data import cache

    while True:
        error = chain / "error.json"
        if error.is_file():
            e = json.loads(error.read_text())
            raise (DataConfigError if e["type"] == "DataConfigError" else RuntimeError)(e["message"])
        if cache.is_done(done):
            return
        last = [j["job"] for j in _jobs(chain)[-2:]]
        if not queued(last) and not cache.is_done(done) and not error.is_file():
            time.sleep(1.0)  # the last step may have just written its result
            if not (cache.is_done(done) or error.is_file() or queued([j["job"] for j in _jobs(chain)[-2:]])):
                raise RuntimeError(f"the data job's Slurm chain ended before the shards were published (last jobs {last}); "
                                   f"see the steps' logs in {chain} and the tasks' in {chain.parents[1]}; "
                                   f"run again to go on from where it stopped")
        time.sleep(cfg.slurm.poll_seconds)


def submit(cfg: DataConfig, script: Path, name: str, module_args: List[str], array: Optional[str] = None,
           after: Optional[str] = None) -> str:
    """Write ``script`` (render_sbatch) and submit it; returns the job id."""
    import subprocess

    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(render_sbatch(cfg, name, module_args, script.parent, array, after))
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataConfigError(f"data.executor=slurm: sbatch refused the job {name} ({script}): {proc.stderr.strip()[-1000:]}; "
                              f"check data.slurm.cluster={cfg.slurm.cluster!r} and its overrides")
    return proc.stdout.strip().split(";")[0]


def queued(jobs: List[str]) -> bool:
    """Whether any of ``jobs`` (array jobs included) is still pending or running."""
    import subprocess

    q = subprocess.run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%T"], capture_output=True, text=True)
    return q.returncode == 0 and bool(q.stdout.strip())


def render_sbatch(cfg: DataConfig, name: str, module_args: List[str], out: Path, array: Optional[str] = None,
                  after: Optional[str] = None) -> str:
    """A job running ``python -m MODULE ARGS`` (an array job when ``array`` is given, one task
    otherwise; started after job ``after`` ends, however it ends), from the cluster file's
    partition, account, qos, time, python, workdir, setup, env and extra_sbatch (secret-looking env
    names come from the submitting shell)."""
    import os
    import shlex

    from pretrain.launch.cluster import load_cluster, sbatch_quote

    sc = cfg.slurm
    c = load_cluster(sc.cluster, list(sc.overrides))
    log = out / ("%A_%a.out" if array else "%j.out")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}"] + ([f"#SBATCH --array={array}"] if array else [])
    lines += ["#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={sc.cpus_per_task if array else 1}",
              f"#SBATCH --output={sbatch_quote(str(log))}", f"#SBATCH --time={sbatch_quote(c.time)}"]
    if after:
        lines += [f"#SBATCH --dependency=afterany:{after}", "#SBATCH --kill-on-invalid-dep=yes"]
    for flag, value in (("partition", c.partition), ("account", c.account), ("qos", c.qos), ("mem-per-cpu", sc.mem_per_cpu)):
        if value:
            lines.append(f"#SBATCH --{flag}={sbatch_quote(str(value))}")
    lines += [f"#SBATCH {x}" for x in c.extra_sbatch]
    lines += ["set -euo pipefail", f"cd {shlex.quote(c.workdir or os.getcwd())}", *c.setup]
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in c.env.items() if v is not None and k not in c.passthrough]
    args = " ".join('"$SLURM_ARRAY_TASK_ID"' if a == "$SLURM_ARRAY_TASK_ID" else shlex.quote(a) for a in module_args)
    lines.append(f"exec {shlex.quote(c.python)} -m {args}")
    return "\n".join(lines) + "\n"
