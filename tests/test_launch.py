"""The sbatch scripts `python -m pretrain.launch slurm` renders, checked line by line."""

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

cd /repo
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

cd /repo
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


def test_an_invalid_plan_is_refused_before_anything_is_queued(capsys):
    assert launch.main(["slurm", "cluster=local-cpu", "parallel=dp2", "trainer.micro_batch_size=3",
                        "trainer.global_batch_size=4", "--dry-run"]) == 2
    assert "trainer.global_batch_size=4" in capsys.readouterr().err


def test_a_plan_that_does_not_fill_whole_nodes_is_refused():
    with pytest.raises(SystemExit, match="needs 16 processes .* not a multiple of 6 per node"):
        launch.main(["slurm", *GPU_ARGS, "cluster.procs_per_node=6", "--dry-run"])


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
