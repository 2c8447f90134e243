"""The sbatch scripts `python -m pretrain.launch slurm` renders, checked line by line."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import launch

GPU_ARGS = ["cluster=gpu-example", "cluster.workdir=/repo", "model=gpt3-xl", "parallel=tp8_dp4_zero1",
            "parallel.data=2", "trainer=gpu", "data=synthetic"]
CPU_ARGS = ["cluster=local-cpu", "cluster.workdir=/repo", "cluster.runs_dir=/tmp/runs", "cluster.job_name=cpu-test",
            "parallel=dp2", "data=synthetic", "model=tiny-gpt", "trainer.max_steps=20",
            "trainer.micro_batch_size=2", "trainer.global_batch_size=4"]

TAIL = """
requeue=0
trap 'requeue=1; echo "USR1: time limit near, the ranks checkpoint"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
trap 'echo "SIGTERM: the ranks checkpoint and stop"' TERM
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \\
    {python} -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc-per-node={nproc} --rdzv-backend=c10d --rdzv-endpoint="$head_node:{port}" --rdzv-id="$SLURM_JOB_ID" --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout={shutdown} -m pretrain.train \\
    {overrides} "hydra.run.dir=$RUN_DIR" &
pid=$!
while :; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done
if [ "$requeue" = 1 ] && [ "$rc" != 0 ]; then
    echo "requeueing job $SLURM_JOB_ID to resume from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
"""

GPU_SCRIPT = """#!/bin/bash
# Rendered by `python -m pretrain.launch slurm`; re-render rather than edit.
#SBATCH --job-name=gpt3-xl-tp8_dp4_zero1
#SBATCH --partition=gpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/%x-%j.out
set -uo pipefail

cd /repo || exit 1
source .venv/bin/activate
export OMP_NUM_THREADS=8
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=WARN
RUN_DIR=runs/"$SLURM_JOB_NAME-$SLURM_JOB_ID"  # the same after a requeue: the run resumes there
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, run dir $RUN_DIR"
""" + TAIL.format(python="python", nproc=8, port=29500, shutdown=240,
                  overrides="model=gpt3-xl parallel=tp8_dp4_zero1 parallel.data=2 trainer=gpu data=synthetic")

CPU_SCRIPT = """#!/bin/bash
# Rendered by `python -m pretrain.launch slurm`; re-render rather than edit.
#SBATCH --job-name=cpu-test
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:10:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=/tmp/runs/%x-%j.out
set -uo pipefail

cd /repo || exit 1
export OMP_NUM_THREADS=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export DS_ACCELERATOR=cpu
export GLOO_SOCKET_IFNAME=lo
export MASTER_ADDR=127.0.0.1
RUN_DIR=/tmp/runs/"$SLURM_JOB_NAME-$SLURM_JOB_ID"  # the same after a requeue: the run resumes there
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, run dir $RUN_DIR"
""" + TAIL.format(python=".venv/bin/python", nproc=2, port=29531, shutdown=60,
                  overrides="parallel=dp2 data=synthetic model=tiny-gpt trainer.max_steps=20 "
                            "trainer.micro_batch_size=2 trainer.global_batch_size=4")


@pytest.mark.parametrize("args, expected", [(GPU_ARGS, GPU_SCRIPT), (CPU_ARGS, CPU_SCRIPT)], ids=["2x8-gpu", "cpu"])
def test_rendered_sbatch_matches_the_expected_script(args, expected, capsys):
    assert launch.main(["slurm", *args, "--dry-run"]) == 0
    assert capsys.readouterr().out == expected


def test_2x8_gpu_job_layout():
    name, cluster_overrides, training = launch.split_overrides(GPU_ARGS)
    cfg, cluster = launch.compose_training(training), launch.load_cluster(name, cluster_overrides)
    assert launch.layout(cfg, cluster) == (2, 8)  # tp8 x dp2 = 16 processes
    script = launch.render(cfg, cluster, training)
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=8" in script
    assert "--signal=B:USR1@300" in script and "--requeue" in script
    assert '--rdzv-backend=c10d --rdzv-endpoint="$head_node:29500"' in script


def test_an_invalid_plan_is_refused_before_anything_is_queued(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        launch.main(["slurm", "cluster=local-cpu", "parallel=dp2", "trainer.micro_batch_size=3",
                     "trainer.global_batch_size=4", "--dry-run"])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert "launch: error:" in captured.err and "trainer.global_batch_size=4" in captured.err
    assert captured.out == ""


def test_a_plan_that_does_not_fill_whole_nodes_is_refused(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        launch.main(["slurm", *GPU_ARGS, "cluster.procs_per_node=6", "--dry-run"])
    assert exit_.value.code == 2
    assert re.search(r"needs 16 processes .* not a multiple of 6 per node", capsys.readouterr().err)


def test_torchrun_script_launches_a_two_process_job(tmp_path):
    import os
    import subprocess
    import sys

    from harness import REPO, child_env
    from pretrain.metrics import read_metrics

    env = {**child_env(), "NPROC_PER_NODE": "2", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [str(REPO / "launchers" / "torchrun.sh"), "data=synthetic", "parallel=tp2", "trainer.max_steps=2",
         "trainer.seq_length=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
         "trainer.progress_bar=false", "logging.wandb=false", "logging.plot=false", f"hydra.run.dir={tmp_path / 'run'}"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert "tensor: 2" in (tmp_path / "run" / "config.yaml").read_text()


# ---------------------------------------------------------------------------------------------
# Bad and hostile input: refused with exit 2 naming the key, or rendered inert.

BASE = ["cluster=local-cpu", "parallel=dp2", "data=synthetic", "model=tiny-gpt", "--dry-run"]
M = "/tmp/pretrain-launch-MARKER"  # a hostile value that ran would create this file

REFUSED = [
    (["cluster.nodes=2"], "cluster.nodes is not a cluster setting; valid keys: name, partition"),
    (["cluster.gpus=8"], "cluster.gpus is not a cluster setting"),
    (["cluster.partition=gpu\ntouch " + M], "cluster.partition="),  # YAML folds the newline: a space, refused
    (['cluster.partition="gpu\\ntouch ' + M + '"'], "cluster.partition="),  # a real newline
    (["cluster.account=acct;touch " + M], "cluster.account="),
    (["cluster.qos=$(touch " + M + ")"], "cluster.qos="),
    (["cluster.job_name=x$(touch " + M + ")"], "cluster.job_name="),
    (["cluster.job_name=a b"], "cluster.job_name="),
    (['cluster.time="24:00:00\\ntouch ' + M + '"'], "cluster.time="),
    (["cluster.time=1:00; touch " + M], "cluster.time="),
    (["cluster.mem=1G; touch " + M], "cluster.mem="),
    (['cluster.extra_sbatch=["--exclusive\\ntouch ' + M + '"]'], "cluster.extra_sbatch[0]"),
    (["cluster.extra_sbatch=[exclusive]"], "cluster.extra_sbatch[0]='exclusive': an sbatch option"),
    (["cluster.env.BAD KEY=1"], "cluster.env.BAD KEY: not a valid environment variable name"),
    (["cluster.env.X;touch " + M + "=1"], "not a valid environment variable name"),
    (["cluster.env.1X=1"], "cluster.env.1X: not a valid environment variable name"),
    (["cluster.env.A.B=1"], "cluster.env.A: must be a string or null"),
    (['cluster.env.FOO="a\\nb"'], "cluster.env.FOO="),
    (["cluster.rdzv_port=99999"], "cluster.rdzv_port=99999: must be an integer between 1 and 65535"),
    (["cluster.rdzv_port=0"], "cluster.rdzv_port=0"),
    (["cluster.rdzv_port=29500; touch " + M], "cluster.rdzv_port=29500; touch"),
    (["cluster.rdzv_port=abc"], "cluster.rdzv_port=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["cluster.shutdown_timeout=-1"], "cluster.shutdown_timeout=-1: must be an integer >= 0"),
    (["cluster.shutdown_timeout=60 && touch " + M], "cluster.shutdown_timeout="),
    (["cluster.signal_seconds=-5"], "cluster.signal_seconds=-5"),
    (["cluster.cpus_per_task=two"], "cluster.cpus_per_task=two"),
    (["cluster.gpus_per_node=-1"], "cluster.gpus_per_node=-1"),
    (["cluster.procs_per_node=0"], "cluster.procs_per_node=0"),
    (['cluster.runs_dir="runs\\ntouch ' + M + '"'], "cluster.runs_dir="),
    (["cluster.runs_dir=runs%x"], "cluster.runs_dir='runs%x': no % or backslash"),
    (["cluster.runs_dir=''"], "cluster.runs_dir: empty"),
    (["cluster.runs_dir="], "cluster.runs_dir=: Incompatible value 'None' for field of type 'str'"),
    (['cluster.python="python\\ntouch ' + M + '"'], "cluster.python="),
    (['cluster.workdir="/tmp\\ntouch ' + M + '"'], "cluster.workdir="),
    (['cluster.srun_args=[--exclusive, "a\\nb"]'], "cluster.srun_args[1]"),
    (['cluster.setup=["module load x\\ntouch ' + M + '"]'], "cluster.setup[0]"),
    (["cluster.setup=5"], "cluster.setup"),
    (["cluster.python=${oc.env:PRETRAIN_TEST_NOT_SET_ANYWHERE}"], "cluster.python: "),
    (["cluster.python"], "cluster.python: expected cluster.KEY=VALUE"),
    (["cluster=does-not-exist"], "cluster=does-not-exist: no "),
    (["cluster=../config"], "cluster=../config: no "),
    (["model=does-not-exist"], "training config: In 'config': Could not find 'model/does-not-exist'"),
    (["trainer.max_step=3"], "trainer.max_step"),
]


@pytest.mark.parametrize("args, fragment", REFUSED, ids=[a[0][:40] for a, _ in REFUSED])
def test_bad_cluster_input_exits_2_naming_the_key(args, fragment, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("PRETRAIN_TEST_NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(SystemExit) as exit_:
        launch.main(["slurm", *BASE, *args])
    captured = capsys.readouterr()
    assert exit_.value.code == 2, captured.err
    assert captured.err.startswith("launch: error: "), captured.err
    assert fragment in captured.err, captured.err
    assert captured.out == "" and "Traceback" not in captured.err
    assert not Path(M).exists()


def test_an_unknown_key_in_a_cluster_file_names_the_file_and_the_key(tmp_path, capsys, monkeypatch):
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "mine.yaml").write_text("name: mine\nprocs_per_node: 2\nnode: 2\n")
    monkeypatch.setattr(launch.cluster, "CONF", tmp_path)  # the module that reads it
    with pytest.raises(launch.ClusterError, match=r"mine\.yaml: cluster\.node is not a cluster setting; valid keys"):
        launch.load_cluster("mine", [])


def test_the_cli_exits_2_without_a_traceback_unless_debugging():
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    cmd = [sys.executable, "-m", "pretrain.launch", "slurm", "cluster=local-cpu", "cluster.nodes=2", "--dry-run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(launch.__file__).parents[1])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("launch: error: cluster.nodes=2: cluster.nodes is not")
    assert "Traceback" not in proc.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env, cwd=Path(launch.__file__).parents[1])
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ClusterError" in debug.stderr


HOSTILE = [
    "python; touch {m};",
    "$(touch {m})",
    "`touch {m}`",
    "'; touch {m}; '",
    '"; touch {m}; echo "',
    "x & touch {m} #",
    "${{IFS}}$(touch {m})",
]

STUBS = {
    # srun records its arguments (one per line) and the environment the script exported.
    "srun": 'printf "%s\\n" "$@" > "$STUB_DIR/srun.args"; printf "%s" "$FOO" > "$STUB_DIR/srun.FOO"',
    "scontrol": 'echo localhost',
    "sbatch": 'echo 1',
    "scancel": 'true',
}


def _stub_path(tmp_path) -> Path:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, body in STUBS.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    return stubs


@pytest.mark.parametrize("hostile", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_values_are_quoted_and_inert_when_bash_runs_the_script(hostile, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    value = hostile.format(m=marker)
    workdir = tmp_path / "work dir"  # spaces in both paths
    workdir.mkdir()
    runs = tmp_path / "runs dir" / value.replace("/", "_")
    args = ["cluster=local-cpu", f"cluster.workdir={workdir}", "cluster.job_name=hostile",
            "parallel=dp2", "data=synthetic", "model=tiny-gpt"]
    if "${" not in value:  # (OmegaConf would read that as an interpolation)
        args += [f"cluster.runs_dir={runs}", f"cluster.python={value}", f"cluster.env.FOO={value}"]
    name, cluster_overrides, training = launch.split_overrides(args)
    cluster = launch.load_cluster(name, cluster_overrides)  # accepted from the command line
    # The exact strings (YAML may have unquoted an override), checked as load_cluster checks them.
    cluster.python, cluster.runs_dir, cluster.env["FOO"], cluster.srun_args = value, str(runs), value, [value]
    assert launch.cluster_problems(cluster) == []
    script = launch.render(launch.compose_training(training), cluster, training)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    stubs = _stub_path(tmp_path)
    env = {"PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "STUB_DIR": str(stubs), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NAME": "hostile", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(path)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr + script
    assert not marker.exists(), script
    assert list(tmp_path.rglob("MARKER")) == []
    srun_args = (stubs / "srun.args").read_text().splitlines()
    # Each value arrived as exactly one argument, unchanged: srun's own, then the interpreter.
    assert srun_args[:5] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", value, value, "-m"], script
    assert f"hydra.run.dir={runs}/hostile-7" in srun_args
    assert (stubs / "srun.FOO").read_text() == value
    assert f"run dir {runs}/hostile-7" in proc.stdout


def test_the_sbatch_header_quotes_values_the_way_sbatch_reads_them():
    assert launch.sbatch_quote("/a/b/%x-%j.out") == "/a/b/%x-%j.out"
    assert launch.sbatch_quote("/a b/#c/%x.out") == '"/a b/#c/%x.out"'
    assert launch.sbatch_quote('a"b\\c') == '"a\\"b\\\\c"'
