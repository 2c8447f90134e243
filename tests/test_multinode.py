"""A multi-node rehearsal on one machine: two hosts as network namespaces (tests/netns.py), each with
its own hostname and address, joined by a veth pair; the filesystem is shared as a cluster's is.

- torchrun on each host, 2 nodes x 2 processes, c10d rendezvous on the first host: tp2 x dp2 matches
  the single process (fp32, 1e-5 relative), the data-parallel all-reduce crossing the hosts.
- Slurm with one slurmd per host (slurmctld on the first) running the rendered sbatch script,
  pp2 x dp2 (pipeline sends crossing the hosts): USR1 before the time limit checkpoints, requeues and
  resumes to the single process's losses.
- A run directory the second host does not share (a private tmpfs over it) is refused with the
  run-directory error (exit 2) before the data or the model is built.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import FAST, REPO, child_env, run_train
from slurm_cluster import SETTINGS, install_slurm, start_munge
from netns import Hosts, SetupError

pytestmark = pytest.mark.distributed

STEPS = 8
COMMON = FAST + ["data=synthetic", f"trainer.max_steps={STEPS}", "trainer.seq_length=64", "trainer.global_batch_size=8",
                 "optim.warmup_tokens=0", "trainer.seed=7", "model=tiny-gpt", "model.hidden_size=64"]
SINGLE = ["parallel=single", "trainer.micro_batch_size=8"]


def _fail(message):
    pytest.fail(f"cannot set up the two test hosts: {message}", pytrace=False)


@pytest.fixture(scope="module")
def hosts():
    try:
        two = Hosts().up()
    except SetupError as err:
        _fail(str(err))
    try:
        yield two
    finally:
        two.down()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run's per-step records."""
    tmp = tmp_path_factory.mktemp("single")
    run_train(COMMON + SINGLE + [f"hydra.run.dir={tmp / 'run'}"], cwd=tmp)
    return _records(tmp / "run")


def _records(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _assert_close(got, want, key, rtol=1e-5):
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        assert abs(g[key] - w[key]) <= rtol * abs(w[key]), f"step {g['step']} {key}: {g[key]} vs single process {w[key]}"


def _torchrun(hosts, tmp, nproc, args, port, private_dir=None, timeout=600) -> list:
    """One torchrun per host (c10d rendezvous on the first); [(exit code, output)] per host.
    ``private_dir``: hidden behind a tmpfs of its own on the second host."""
    procs = []
    for host in hosts.names:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(hosts.names)}", f"--nproc-per-node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={hosts.names[0]}:{port}", f"--rdzv-id=rehearsal-{port}",
               "-m", "pretrain.train", *args]
        private = private_dir if host != hosts.names[0] else None
        log = open(tmp / f"{host}.out", "w+")
        procs.append((subprocess.Popen(hosts.command(host, cmd, private), env=child_env(), cwd=tmp, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), log))
    results, deadline = [], time.monotonic() + timeout
    try:
        for proc, log in procs:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.seek(0)
            results.append((proc.returncode, log.read()))
            log.close()
    return results


def test_torchrun_across_two_hosts_matches_the_single_process(hosts, reference, tmp_path):
    run_dir = tmp_path / "run"
    out = _torchrun(hosts, tmp_path, 2, COMMON + ["parallel=tp2_dp2_zero1", "trainer.micro_batch_size=4",
                                                  f"hydra.run.dir={run_dir}"], port=29641)
    assert [rc for rc, _ in out] == [0, 0], "\n".join(text[-3000:] for _, text in out)
    records = _records(run_dir)
    _assert_close(records, reference, "loss")
    _assert_close(records, reference, "grad_norm")
    assert not list(run_dir.glob(".shared-check*")), "the run-directory check leaves no markers behind"


def test_a_run_directory_the_hosts_do_not_share_is_refused_before_training(hosts, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    run_dir = runs / "run"
    out = _torchrun(hosts, tmp_path, 1, COMMON + ["parallel=dp2", "trainer.micro_batch_size=4",
                                                  f"hydra.run.dir={run_dir}"], port=29642, private_dir=runs)
    assert all(rc != 0 for rc, _ in out), "\n".join(text[-3000:] for _, text in out)
    for (_, text), host, other in zip(out, hosts.names, reversed(hosts.names)):
        assert f"train: error: hydra.run.dir={run_dir} is not one directory shared by the 2 nodes" in text, text[-3000:]
        assert f"node {host} (rank " in text and f"does not see the files {other} wrote there" in text
        assert "filesystem every node mounts" in text and "(exitcode: 2)" in text  # a UserError's exit code
        assert "parameters" not in text, "refused before the model is built"
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    assert not list(run_dir.glob(".shared-check*"))


SLURM_CONF = """ClusterName=pretrain-multinode
SlurmctldHost={head}({head_addr})
SlurmctldPort=6927
SlurmdPort=6928
{settings}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


def _slurm_logs(root: Path) -> str:
    return "".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(root.glob("*.log")))


@pytest.fixture(scope="module")
def slurm(hosts, tmp_path_factory):
    """slurmctld and a slurmd on the first host, a slurmd on the second: (hosts, environment)."""
    install_slurm()
    root = tmp_path_factory.mktemp("slurm")
    (root / "state").mkdir()
    nodes = "\n".join(f"NodeName={n} NodeAddr={a} CPUs=2 RealMemory=4000 State=UNKNOWN" for n, a in hosts.addresses.items())
    head = hosts.names[0]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, head=head, head_addr=hosts.addresses[head], nodes=nodes,
                                      names=",".join(hosts.names), settings=SETTINGS))
    for name in hosts.names:
        (root / f"spool-{name}").mkdir()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started_munge = start_munge()
    try:
        for host, daemon in ((head, "slurmctld"), *((h, "slurmd") for h in hosts.names)):
            proc = subprocess.run(hosts.command(host, [daemon]), env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                _fail(f"{daemon} on {host} exited {proc.returncode}: {proc.stderr[-2000:]}{_slurm_logs(root)}")
        deadline = time.monotonic() + 60
        while True:
            states = _ctl(hosts, env, "sinfo", "-h", "-N", "-o", "%N %t").split("\n")
            if sorted(states) == [f"{n} idle" for n in hosts.names]:
                break
            if time.monotonic() > deadline:
                _fail(f"node states {states} after 60 s\n{_slurm_logs(root)}")
            time.sleep(1)
        yield hosts, env
    finally:
        pids = [p.read_text().strip() for p in root.glob("*.pid")]
        subprocess.run(hosts.command(head, ["scontrol", "shutdown"]), env=env, capture_output=True)
        for pid in pids:
            for _ in range(50):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.2)
            else:
                os.kill(int(pid), signal.SIGTERM)  # a daemon that never reached the controller
        if started_munge:
            subprocess.run(["/usr/sbin/munged", "-s"], capture_output=True)


def _ctl(hosts, env, *argv) -> str:
    """A Slurm client command, run on the first host (where slurmctld listens)."""
    return subprocess.run(hosts.command(hosts.names[0], list(argv)), env=env, capture_output=True, text=True).stdout.strip()


def _job(hosts, env, job) -> dict:
    out = _ctl(hosts, env, "scontrol", "show", "job", "-o", job)
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def _wait_state(hosts, env, job, states, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        info = _job(hosts, env, job)
        if info.get("JobState") in states:
            return info
        assert time.monotonic() < deadline, f"job {job} still {info.get('JobState')} after {timeout} s"
        time.sleep(1)


def test_slurm_across_two_slurmd_nodes_requeues_on_usr1_and_resumes_to_the_single_process(slurm, reference, tmp_path):
    hosts, env = slurm
    runs, script, name = tmp_path / "runs", tmp_path / "job.sbatch", "rehearsal"
    runs.mkdir()
    render = [sys.executable, "-m", "pretrain.launch", "slurm", "cluster=local-cpu-2node", f"cluster.workdir={REPO}",
              f"cluster.python={sys.executable}", f"cluster.runs_dir={runs}", f"cluster.job_name={name}",
              *COMMON, "parallel=pp2_dp2_zero1", "trainer.micro_batch_size=4", "--dry-run", "--output", str(script)]
    proc = subprocess.run(render, env=child_env(), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "#SBATCH --nodes=2" in script.read_text() and "--nproc-per-node=2" in script.read_text()
    # A second per step: the signal lands mid-run however fast (or loaded) the machine is.
    job_env = {**child_env(), "SLURM_CONF": env["SLURM_CONF"], "PRETRAIN_TEST_FAULTS": "step_delay=1.0"}
    submitted = subprocess.run(hosts.command(hosts.names[0], ["sbatch", "--parsable", script]), env=job_env,
                               capture_output=True, text=True, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    run_dir, log_file = runs / f"{name}-{job}", runs / f"{name}-{job}.out"
    _wait_state(hosts, env, job, {"RUNNING", "COMPLETED", "FAILED", "CANCELLED"})
    deadline = time.monotonic() + 480
    while len(_records(run_dir)) < 2:
        assert time.monotonic() < deadline and _job(hosts, env, job).get("JobState") == "RUNNING", log_file.read_text()[-4000:]
        time.sleep(0.5)
    # What --signal=B:USR1@N sends before the time limit.
    _ctl(hosts, env, "scancel", "--batch", "--signal=USR1", job)
    info = _wait_state(hosts, env, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=600)
    log = log_file.read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert info["NodeList"] == "mn[1-2]" and int(info["Restarts"]) == 1, log[-4000:]
    assert "requeueing job" in log and "received SIGUSR1: stopping" in log
    stopped = int(log.split("state saved in")[1].split("at step ")[1].split()[0])
    assert 2 <= stopped < STEPS, "the job must have been interrupted mid-run"
    assert f"resumed from {run_dir / 'checkpoints'} at step {stopped}" in log
    records = _records(run_dir)
    _assert_close(records, reference, "loss")
    _assert_close(records, reference, "grad_norm")
