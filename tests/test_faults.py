"""Bad losses skip the update; stop signals save and exit; a dead rank ends the job; runs resume."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import FAST, REPO, child_env, run_train
from pretrain.metrics import read_metrics

pytestmark = pytest.mark.distributed

TINY = FAST + [
    "data=synthetic", "model=tiny-gpt", "model.hidden_size=64", "trainer.seq_length=32",
    "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "logging.wandb=false",
]


def _command(nproc: int, args: list, launcher: tuple = ()) -> list:
    if nproc == 1:
        return [sys.executable, "-m", "pretrain.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *launcher,
            "-m", "pretrain.train", *args]


def _run(cwd: Path, nproc: int, args: list, env=None, timeout=300, launcher: tuple = ()):
    return subprocess.run(_command(nproc, args, launcher), env={**child_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def _start(cwd: Path, nproc: int, args: list, log: Path, env=None):
    """A job in its own process group (as under slurmstepd), output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(_command(nproc, args), env={**child_env(), **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)


def _descendants(pid: int) -> list:
    """Child processes of ``pid``, recursively (torchrun starts its workers in sessions of their own)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


@pytest.fixture
def jobs():
    """Jobs started by a test; any still running when it ends (a failed check) are killed, workers included."""
    started = []
    yield started
    for job in started:
        if job.poll() is None:
            for pid in [job.pid, *_descendants(job.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            job.wait()


def _wait_for(predicate, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"job exited early ({proc.returncode})"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def _steps(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _state(tag_dir: Path) -> dict:
    return json.loads((tag_dir / "manifest.json").read_text())["train_state"]


def _intact(tag_dir: Path) -> bool:
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    return all(hashlib.sha256((tag_dir / name).read_bytes()).hexdigest() == entry["sha256"]
               for name, entry in manifest["files"].items())


def _rank_pids(job) -> dict:
    """{RANK: pid} of the workers torchrun (``job``) started."""
    ranks = {}
    for pid in Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")), None)
        ranks[int(rank)] = int(pid)
    return ranks


def _assert_stopped_with_checkpoint(run: Path, after: int, log: str) -> int:
    """The step the run stopped at: its metrics end there and an intact checkpoint holds that step."""
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").is_file(), log[-3000:]
    stopped = int((ckpts / "latest").read_text()[4:])
    assert stopped > after, (stopped, after)
    assert _state(ckpts / f"step{stopped:08d}")["step"] == stopped
    assert _intact(ckpts / f"step{stopped:08d}")
    assert [r["step"] for r in _steps(run)][-1] == stopped, "the step in progress is finished and logged"
    return stopped


# Slow steps (a planted sleep after each) so that a signal lands mid-run; a run the signal fails to
# stop ends by itself after 150 steps (~30 s) and fails the exit-code check.
SLOW = {"PRETRAIN_TEST_FAULTS": "step_delay=0.2"}


def test_usr1_and_sigterm_finish_the_step_save_and_exit_75_and_the_next_launch_resumes(tmp_path, jobs):
    """One process, no launcher in between: the exit code is the trainer's own (faults.EXIT_STOPPED).
    USR1 (Slurm's warning before the time limit) stops the first launch; the relaunch in the same run
    directory resumes from that checkpoint and is stopped by SIGTERM (scancel, preemption)."""
    run = tmp_path / "run"
    args = TINY + ["trainer.max_steps=150", f"hydra.run.dir={run}"]
    stopped = 0
    for launch, sig in enumerate((signal.SIGUSR1, signal.SIGTERM)):
        log_path = tmp_path / f"{sig.name}.log"
        job = _start(tmp_path, 1, args, log_path, env=SLOW)
        jobs.append(job)
        _wait_for(lambda: len(_steps(run)) >= stopped + 2, job)
        job.send_signal(sig)
        code = job.wait(timeout=120)
        log = log_path.read_text()
        assert code == 75, f"{sig.name}: exit code {code}, want 75 (stopped with a checkpoint)\n{log[-3000:]}"
        assert f"received {sig.name}: stopping; run again to resume" in log, log[-3000:]
        if launch:
            assert f"resumed from {run / 'checkpoints'} at step {stopped}" in log, log[-3000:]
        stopped = _assert_stopped_with_checkpoint(run, stopped, log)
        assert [r["step"] for r in _steps(run)] == list(range(1, stopped + 1)), "each step logged once"
    assert stopped < 150


def test_usr1_to_one_rank_stops_every_rank_at_the_same_step_with_exit_75(tmp_path, jobs):
    """dp2 under torchrun: only rank 1 gets USR1 (as when a signal reaches the ranks at different
    times); rank 0 learns it through the per-step all-reduce, both save the same step and exit 75."""
    run = tmp_path / "run"
    # A short collective timeout: ranks that disagree about stopping fail in 30 s instead of hanging.
    job = _start(tmp_path, 2, TINY + ["parallel=dp2", "trainer.max_steps=150", "parallel.timeout_minutes=0.5",
                                      f"hydra.run.dir={run}"], tmp_path / "job.log", env=SLOW)
    jobs.append(job)
    _wait_for(lambda: len(_steps(run)) >= 2, job)
    os.kill(_rank_pids(job)[1], signal.SIGUSR1)
    assert job.wait(timeout=120) != 0
    log = (tmp_path / "job.log").read_text()
    # torchrun exits 1 and lists the workers' own exit codes: 75 for the first to exit; it then
    # SIGTERMs the others, which may still be tearing down (-15) or have exited 75 too.
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", log)]
    assert 75 in codes and set(codes) <= {75, -15}, (codes, log[-4000:])
    assert "received a stop signal (on another rank): stopping" in log, log[-3000:]  # rank 0 logs
    stopped = _assert_stopped_with_checkpoint(run, 1, log)
    tag_dir = run / "checkpoints" / f"step{stopped:08d}"
    assert json.loads((tag_dir / "manifest.json").read_text())["world_size"] == 2
    assert (tag_dir / "rng" / "rank00001.pt").is_file(), "rank 1 saved the same step"


def test_nan_losses_skip_the_update_and_too_many_in_a_row_stop_with_state_saved(tmp_path):
    run = tmp_path / "run"
    proc = _run(tmp_path, 1, TINY + [
        "trainer.max_steps=20", "checkpoint.interval=1", "checkpoint.keep_last=0",
        "trainer.max_consecutive_skips=3", f"hydra.run.dir={run}",
    ], env={"PRETRAIN_TEST_FAULTS": "nan_steps=3,5,6,7"})
    assert proc.returncode == 65, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "3 updates in a row were skipped" in out
    assert "step 3: update skipped (loss is nan); 1 in a row, 1 in total" in out

    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000007", "the run stops at the third bad step in a row"
    state = _state(ckpts / "step00000007")
    assert (state["skipped_steps"], state["consecutive_skips"]) == (4, 3)

    def weights(step):
        states = torch.load(ckpts / f"step{step:08d}" / "mp_rank_00_model_states.pt", weights_only=False)
        return {k: v for k, v in states["module"].items() if torch.is_tensor(v)}, states["optimizer"]["state"]

    # A skipped update leaves the weights and Adam's moments exactly as they were.
    for before, after in ((2, 3), (4, 7)):
        (m0, o0), (m1, o1) = weights(before), weights(after)
        assert all(torch.equal(m0[k], m1[k]) for k in m0), (before, after)
        assert all(torch.equal(o0[i]["exp_avg"], o1[i]["exp_avg"]) for i in o0), (before, after)
    m3, _ = weights(3)
    m4, _ = weights(4)
    assert not all(torch.equal(m3[k], m4[k]) for k in m3), "step 4 is a normal update"
    records = _steps(run)
    assert [r["step"] for r in records] == list(range(1, 8))
    assert all(r["loss"] == r["loss"] for r in records if r["step"] in (1, 2, 4)), "finite losses elsewhere"


def test_sigterm_saves_and_exits_then_a_killed_rank_ends_the_job_and_a_relaunch_resumes(tmp_path, jobs):
    run = tmp_path / "run"
    common = TINY + ["parallel=dp2", "trainer.max_steps=400", f"hydra.run.dir={run}"]
    ckpts = run / "checkpoints"

    # SIGTERM to every process of the job, as slurmstepd sends it: each rank gets it twice (directly
    # and forwarded by torchrun). torchrun starts its workers in sessions of their own, so its
    # process group alone would reach only torchrun.
    job = _start(tmp_path, 2, common, tmp_path / "first.log")
    jobs.append(job)
    _wait_for(lambda: len(_steps(run)) >= 2, job)
    ranks = _rank_pids(job)
    os.killpg(job.pid, signal.SIGTERM)
    for pid in ranks.values():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    code = job.wait(timeout=120)
    log = (tmp_path / "first.log").read_text()
    assert code != 0, log[-3000:]
    assert "received SIGTERM: stopping" in log, log[-3000:]
    stopped = int((ckpts / "latest").read_text()[4:])
    assert stopped >= 2 and _state(ckpts / f"step{stopped:08d}")["step"] == stopped
    assert _steps(run)[-1]["step"] == stopped

    # Relaunch: resumes where it stopped; kill -9 one rank after the next checkpoint.
    job = _start(tmp_path, 2, common + ["checkpoint.interval=2"], tmp_path / "second.log")
    jobs.append(job)
    _wait_for(lambda: (ckpts / "latest").read_text() != f"step{stopped:08d}", job)
    os.kill(_rank_pids(job)[1], signal.SIGKILL)
    code = job.wait(timeout=120)  # bounded: no hang on the surviving rank
    log = (tmp_path / "second.log").read_text()
    assert code != 0
    assert f"at step {stopped}" in log
    last = int((ckpts / "latest").read_text()[4:])
    assert last > stopped

    proc = _run(tmp_path, 2, TINY + ["parallel=dp2", f"trainer.max_steps={last + 2}", "checkpoint.save_final=true", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {last}" in proc.stdout + proc.stderr
    assert (ckpts / "latest").read_text() == f"step{last + 2:08d}"


def test_a_hung_rank_fails_the_job_after_the_collective_timeout(tmp_path):
    """Rank 1 stops answering after step 1 (planted 10-minute sleep); rank 0 gives up waiting in the
    next collective after parallel.timeout_minutes (6 s here), and the job ends instead of holding
    its allocation for the 30-minute default."""
    start = time.monotonic()
    proc = _run(tmp_path, 2, TINY + ["parallel=dp2", "trainer.max_steps=5", "parallel.timeout_minutes=0.1"],
                env={"PRETRAIN_TEST_FAULTS": "step_delay=600@1"}, timeout=240,
                launcher=("--shutdown-timeout=5",))  # torchrun's grace before it SIGKILLs the hung rank
    assert proc.returncode != 0
    assert "timed out" in (proc.stdout + proc.stderr).lower(), proc.stderr[-3000:]
    assert time.monotonic() - start < 180


def test_loss_spikes_are_skipped_under_the_pipeline_engine_and_stop_the_run(tmp_path):
    """pp2: with a spike threshold below any real loss, every update after the first is skipped and
    counted on every stage, and three in a row stop the run (exit 65) with its state saved."""
    run_dir = tmp_path / "run"
    proc = run_train(
        ["data=synthetic", "parallel=pp2", "model.hidden_size=64", "trainer.max_steps=10", "trainer.seq_length=32",
         "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.loss_spike_factor=0.5",
         "trainer.max_consecutive_skips=3", "trainer.progress_bar=false", "logging.wandb=false", "logging.plot=false",
         "trainer.eval_interval=0", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, nproc=2, check=False,
    )
    # The ranks exit 65 after saving; torchrun reports a failed worker with its own non-zero code.
    assert proc.returncode != 0 and "exitcode: 65" in proc.stderr, proc.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 3]
    log = (run_dir / "train.log").read_text()  # rank 0 is the first stage; the loss lives on the last
    assert "update skipped (bad loss on another pipeline stage)" in log
    assert "3 updates in a row were skipped" in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000004"


def test_deepspeed_launcher_script_runs_a_two_process_job(tmp_path):
    env = {**child_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [str(REPO / "launchers" / "deepspeed.sh"), "--num_gpus", "2", "--", "data=synthetic", "parallel=dp2_zero1",
         "trainer.max_steps=2", "trainer.seq_length=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
         "trainer.progress_bar=false", "logging.wandb=false", "logging.plot=false", f"hydra.run.dir={tmp_path / 'run'}"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
