"""Against a real single-node Slurm (Debian's munge + slurmctld + slurmd on loopback), started here.

The fixture apt-get installs the packages when they are missing (CI runs as root) and fails with a
clear message when it cannot start Slurm. Jobs are rendered by `python -m pretrain.launch slurm`.
"""

import json
import subprocess
import sys
import time

import pytest

from harness import REPO, child_env

pytestmark = pytest.mark.distributed

TRAIN = ["parallel=dp2", "data=synthetic", "model=tiny-gpt", "model.hidden_size=64", "trainer.seq_length=32",
         "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.progress_bar=false",
         "logging.plot=false", "logging.wandb=false", "trainer.eval_interval=0"]


def _submit(slurm, tmp_path, name, *overrides, env=None, runs="runs") -> str:
    script = tmp_path / f"{name}.sbatch"
    runs = tmp_path / runs
    runs.mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.launch", "slurm", "cluster=local-cpu", f"cluster.workdir={REPO}",
         f"cluster.python={sys.executable}", f"cluster.runs_dir={runs}", f"cluster.job_name={name}",
         *TRAIN, *overrides, "--dry-run", "--output", str(script)],
        env={**child_env(), **slurm, **(env or {})}, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = subprocess.run(["sbatch", "--parsable", str(script)], env={**child_env(), **slurm, **(env or {})},
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    return job


def _job(slurm, job) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm, capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def _wait_state(slurm, job, states, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        info = _job(slurm, job)
        if info.get("JobState") in states:
            return info
        assert time.monotonic() < deadline, f"job {job} still {info.get('JobState')} after {timeout} s"
        time.sleep(1)


def _metrics(tmp_path, name, job, runs="runs") -> list:
    path = tmp_path / runs / f"{name}-{job}" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _log(tmp_path, name, job, runs="runs") -> str:
    path = tmp_path / runs / f"{name}-{job}.out"
    return path.read_text() if path.is_file() else ""


STEPS = 12


@pytest.fixture(scope="module")
def completed(slurm, tmp_path_factory):
    """An uninterrupted job: (records, log, final job info); also the reference for the requeue test."""
    tmp = tmp_path_factory.mktemp("complete")
    job = _submit(slurm, tmp, "complete", f"trainer.max_steps={STEPS}")
    info = _wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    return _metrics(tmp, "complete", job), _log(tmp, "complete", job), info, tmp / "runs" / f"complete-{job}"


def test_sbatch_job_completes_and_trains(completed):
    records, log, info, run_dir = completed
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["loss"] < records[0]["loss"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{STEPS:08d}"


def test_usr1_before_the_time_limit_checkpoints_requeues_and_resumes_to_the_same_losses(slurm, completed, tmp_path):
    # Half a second per step: the signal lands mid-run however fast the machine is.
    job = _submit(slurm, tmp_path, "requeue", f"trainer.max_steps={STEPS}", env={"PRETRAIN_TEST_FAULTS": "step_delay=0.5"})
    _wait_state(slurm, job, {"RUNNING"})
    deadline = time.monotonic() + 240
    while len(_metrics(tmp_path, "requeue", job)) < 3:
        assert time.monotonic() < deadline, _log(tmp_path, "requeue", job)[-4000:]
        time.sleep(0.5)
    # What --signal=B:USR1@N sends before the time limit.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True)
    info = _wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=600)
    log = _log(tmp_path, "requeue", job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert int(info["Restarts"]) == 1, log[-4000:]
    assert "requeueing job" in log and "received SIGUSR1: stopping" in log
    records = _metrics(tmp_path, "requeue", job)
    stopped = int(log.split("state saved in")[1].split("at step ")[1].split()[0])
    assert 3 <= stopped < STEPS, "the job must have been interrupted mid-run"
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "resumed exactly where it stopped"
    assert [r["loss"] for r in records] == [r["loss"] for r in completed[0]], "fp32: identical to the uninterrupted job"


def test_scancel_makes_the_ranks_save_an_intact_checkpoint(slurm, tmp_path):
    job = _submit(slurm, tmp_path, "cancel", "trainer.max_steps=400")
    _wait_state(slurm, job, {"RUNNING"})
    deadline = time.monotonic() + 240
    while len(_metrics(tmp_path, "cancel", job)) < 2:
        assert time.monotonic() < deadline, _log(tmp_path, "cancel", job)[-4000:]
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=slurm, check=True)
    info = _wait_state(slurm, job, {"CANCELLED", "FAILED", "COMPLETED"}, timeout=120)
    assert info["JobState"] == "CANCELLED"
    ckpts = tmp_path / "runs" / f"cancel-{job}" / "checkpoints"
    deadline = time.monotonic() + 60  # the ranks may still be finishing the save when the state flips
    while not (ckpts / "latest").is_file():
        assert time.monotonic() < deadline, _log(tmp_path, "cancel", job)[-4000:]
        time.sleep(0.5)
    tag = (ckpts / "latest").read_text()
    manifest = json.loads((ckpts / tag / "manifest.json").read_text())
    assert manifest["train_state"]["step"] >= 2 and manifest["world_size"] == 2
    assert not (ckpts / ".tmp").exists()
    assert "received SIGTERM: stopping" in _log(tmp_path, "cancel", job)


def test_hydra_sweep_runs_each_point_as_a_slurm_job_whose_tasks_are_the_ranks(slurm, tmp_path):
    """`-m hydra/launcher=slurm`: a model-size sweep, one Slurm job per point, 2 srun tasks as dp2 ranks
    (no torchrun: pretrain.engine.groups takes rank and world size from Slurm)."""
    sweep = tmp_path / "sweep"
    train = [arg for arg in TRAIN if not arg.startswith("model=")]
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
         "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=10", f"hydra.launcher.submitit_folder={tmp_path / 'submitit'}",
         f"hydra.sweep.dir={sweep}", *train, "trainer.max_steps=2", "model=tiny-gpt,tiny-llama"],
        env={**child_env(), **slurm}, capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for num, model in ((0, "tiny-gpt"), (1, "tiny-llama")):
        run = sweep / str(num)
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        config = (run / "config.yaml").read_text()
        assert f"name: {model}" in config and "data: 2" in config


def test_a_runs_dir_with_a_space_and_a_secret_passed_by_name(slurm, tmp_path):
    """The run directory and the job log land under a path with a space; a secret-looking cluster.env
    entry reaches the job from the submitting environment (the script stops, naming it, if it does not)
    and no file the job writes, the script included, holds its value."""
    sentinel = "sentinel-7b1d2e9f-not-in-any-file"
    runs = "runs with space"
    job = _submit(slurm, tmp_path, "space", "trainer.max_steps=2", "cluster.env.PRETRAIN_TEST_TOKEN=null",
                  "model.reference_params=${oc.env:PRETRAIN_TEST_TOKEN}",
                  env={"PRETRAIN_TEST_TOKEN": sentinel}, runs=runs)
    info = _wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    log = _log(tmp_path, "space", job, runs)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert [r["step"] for r in _metrics(tmp_path, "space", job, runs)] == [1, 2]
    run_dir = tmp_path / runs / f"space-{job}"
    assert "reference_params: ${oc.env:PRETRAIN_TEST_TOKEN}" in (run_dir / "config.yaml").read_text()
    script = (tmp_path / "space.sbatch").read_text()
    assert "#SBATCH --export=ALL,PRETRAIN_TEST_TOKEN" in script
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and sentinel.encode() in p.read_bytes()]
    assert leaks == []
