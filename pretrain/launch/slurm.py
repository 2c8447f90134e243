"""``python -m pretrain.launch slurm [cluster=NAME] [cluster.KEY=VALUE] [training overrides] [--dry-run]``

Renders an sbatch script from the composed training config (validated here, before anything is
queued) and a ``pretrain/conf/cluster/<NAME>.yaml`` (partition, account, GPUs and CPUs per node, time limit,
environment set-up, extra ``#SBATCH`` lines), then submits it with ``sbatch`` or, with ``--dry-run``,
prints it (``--output FILE`` writes it).

The job runs one ``srun`` task per node, each starting torchrun with a c10d rendezvous on the first
node. Preemption: Slurm sends the batch shell USR1 ``signal_seconds`` before the time limit; the shell
forwards it to the ranks, which finish the step, checkpoint and exit, and the shell requeues the job
(``scontrol requeue``), which resumes from the checkpoint in the same run directory (named after the
job). scancel's SIGTERM also makes the ranks save before they exit; that job is not requeued.
``cluster.runs_dir`` must be on a filesystem every node mounts at the same path: a run directory some
node does not see is refused before training starts (``pretrain.train.rundir``).

The cluster file and its overrides are checked against ``ClusterConfig``: unknown keys, wrong types
and values that cannot be rendered safely are refused (exit 2) naming the key. Every value that a
shell reads is shlex-quoted (``setup`` lines are the one place for shell code), ``#SBATCH`` values are
quoted as sbatch reads them, and secret-looking ``env`` entries are passed by name only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from pretrain.config import compose_training, world_size
from pretrain.errors import UserError, user_errors

from pretrain.launch.cluster import JOB_NAME, TORCHRUN_SIGNALS, ClusterConfig, ClusterError, load_cluster, sbatch_quote


def split_overrides(args: list[str]) -> tuple[str, list[str], list[str]]:
    """(cluster name, cluster.KEY=VALUE overrides without the prefix, training overrides)."""
    name, cluster, training = "gpu-example", [], []
    for arg in args:
        if arg.startswith("cluster="):
            name = arg.split("=", 1)[1]
        elif arg.startswith("cluster."):
            cluster.append(arg[len("cluster."):])
        else:
            training.append(arg)
    return name, cluster, training


def layout(cfg: DictConfig, cluster: ClusterConfig) -> tuple[int, int]:
    """(nodes, processes per node) for the config's tp x pp x dp x cp processes."""
    world = world_size(cfg.parallel)
    per_node = cluster.procs_per_node or cluster.gpus_per_node
    if not per_node:
        raise ClusterError(f"cluster {cluster.name}: set cluster.gpus_per_node or cluster.procs_per_node")
    if world % per_node and world > per_node:
        raise ClusterError(
            f"the plan needs {world} processes (tensor x pipeline x data x context), not a multiple of "
            f"{per_node} per node on cluster {cluster.name}; change parallel.data or cluster.procs_per_node"
        )
    return max(1, world // per_node), min(world, per_node)


def job_name(cfg: DictConfig, cluster: ClusterConfig) -> str:
    job = cluster.job_name or f"{cfg.model.name}-{cfg.parallel.name}"
    if not JOB_NAME.fullmatch(job):
        raise ClusterError(f"job name {job!r} (from model.name and parallel.name): set cluster.job_name to "
                           "letters, digits, _ . + - only")
    return job


def render(cfg: DictConfig, cluster: ClusterConfig, training: list[str]) -> str:
    """The sbatch script (text) for this training config on this cluster.

    Every value from the cluster config is validated (``cluster_problems``) and shell-quoted where
    a shell reads it; ``#SBATCH`` values are quoted the way sbatch reads them. Environment
    variables in ``cluster.passthrough`` appear by name only (``--export`` and a check).
    """
    nodes, per_node = layout(cfg, cluster)
    job = job_name(cfg, cluster)
    runs = cluster.runs_dir
    q = shlex.quote
    sbatch = [f"--job-name={job}"]
    for key in ("partition", "account", "qos"):
        if getattr(cluster, key):
            sbatch.append(f"--{key}={sbatch_quote(getattr(cluster, key))}")
    sbatch += [f"--nodes={nodes}", "--ntasks-per-node=1"]
    if cluster.gpus_per_node:
        sbatch.append(f"--gpus-per-node={cluster.gpus_per_node}")
    sbatch.append(f"--cpus-per-task={cluster.cpus_per_task}")
    if cluster.mem and cluster.mem != "0":
        sbatch.append(f"--mem={cluster.mem}")
    sbatch += [
        f"--time={cluster.time}",
        f"--signal=B:USR1@{cluster.signal_seconds}",  # B: the batch shell only; it forwards to the ranks
        "--requeue",
        "--open-mode=append",  # a requeued job appends to its log
        f"--output={sbatch_quote(f'{runs}/%x-%j.out')}",
    ]
    passthrough = cluster.passthrough
    if passthrough:  # values come from the submitting shell, never from this file
        sbatch.append(f"--export=ALL,{','.join(passthrough)}")
    sbatch += list(cluster.extra_sbatch)

    env = {"OMP_NUM_THREADS": str(max(1, cluster.cpus_per_task // per_node)),
           # A failed collective raises instead of hanging, so a dead rank ends the job.
           "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    env.update({k: v for k, v in cluster.env.items() if k not in passthrough})

    user_run_dir = any(o.startswith("hydra.run.dir=") for o in training)
    train_args = " ".join(q(o) for o in training)
    if not user_run_dir:
        train_args = (train_args + ' "hydra.run.dir=$RUN_DIR"').strip()
    srun = ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"] + [q(a) for a in cluster.srun_args]
    torchrun = [
        q(cluster.python), "-m", "torch.distributed.run",
        '--nnodes="$SLURM_NNODES"', f"--nproc-per-node={per_node}",
        "--rdzv-backend=c10d", f'--rdzv-endpoint="$head_node:{cluster.rdzv_port}"', '--rdzv-id="$SLURM_JOB_ID"',
        # torchrun passes USR1 on to its workers and gives them time to save before killing them.
        f"--signals-to-handle={TORCHRUN_SIGNALS}", f"--shutdown-timeout={cluster.shutdown_timeout}",
        "-m", "pretrain.train",
    ]
    lines = [
        "#!/bin/bash",
        "# Rendered by `python -m pretrain.launch slurm`; re-render rather than edit.",
        *(f"#SBATCH {s}" for s in sbatch),
        "set -uo pipefail",
        "",
        f"cd {q(str(cluster.workdir or Path.cwd()))} || exit 1",
        *cluster.setup,
        *(f"export {k}={q(v)}" for k, v in env.items()),
        *(f': "${{{k}:?is not set: export it in the shell that runs sbatch (cluster.env.{k})}}"' for k in passthrough),
        f'RUN_DIR={q(runs)}/"$SLURM_JOB_NAME-$SLURM_JOB_ID"  # the same after a requeue: the run resumes there',
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, run dir $RUN_DIR"',
        "",
        "requeue=0",
        "trap 'requeue=1; echo \"USR1: time limit near, the ranks checkpoint\"; scancel --signal=USR1 \"$SLURM_JOB_ID\"' USR1",
        "trap 'echo \"SIGTERM: the ranks checkpoint and stop\"' TERM",
        " ".join(srun) + " \\",
        "    " + " ".join(torchrun) + " \\",
        f"    {train_args} &",
        "pid=$!",
        # wait returns early when a trapped signal arrives: keep waiting for srun itself.
        'while :; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done',
        'if [ "$requeue" = 1 ] && [ "$rc" != 0 ]; then',
        '    echo "requeueing job $SLURM_JOB_ID to resume from its checkpoint"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


def check_passthrough(cluster: ClusterConfig, environ=None) -> None:
    """Every variable the job takes from the submitting shell must be set there."""
    environ = os.environ if environ is None else environ
    missing = [k for k in cluster.passthrough if not environ.get(k)]
    if missing:
        raise ClusterError(
            f"{', '.join(missing)} not set in this shell: cluster.env names "
            f"{'them' if len(missing) > 1 else 'it'} and the job takes the value from the environment sbatch "
            f"runs in (never from the script); `export {missing[0]}=...` and submit again"
        )


def slurm(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.launch slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print (or --output) the script; submit nothing")
    parser.add_argument("--output", help="write the script here (default: <runs_dir>/sbatch/<job>.sbatch)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a configuration error")
    parser.add_argument("overrides", nargs="*", help="cluster=NAME, cluster.KEY=VALUE and training overrides")
    args = parser.parse_intermixed_args(argv)
    name, cluster_overrides, training = split_overrides(args.overrides)
    cluster = load_cluster(name, cluster_overrides)
    cfg = compose_training(training)
    layout(cfg, cluster)
    from pretrain.validate import validate

    world = world_size(cfg.parallel)
    validate(cfg, world)  # ConfigError: exit 2
    if cluster.gpu:
        from pretrain.plan.check import prelaunch

        prelaunch(cfg, world, gpu=cluster.gpu)  # PlanError (exit 2) before anything is queued
    script = render(cfg, cluster, training)
    if args.dry_run and not args.output:
        sys.stdout.write(script)
        return 0
    path = Path(args.output or Path(cluster.runs_dir) / "sbatch" / f"{cluster.job_name or cfg.model.name}.sbatch")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    if args.dry_run:
        print(path)
        return 0
    check_passthrough(cluster)
    Path(cluster.runs_dir).mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    except FileNotFoundError as err:
        raise UserError(f"sbatch not found: submit from a Slurm login node, or use --dry-run ({path})") from err
    if proc.returncode != 0:
        raise UserError(f"sbatch refused {path} (exit {proc.returncode}): {proc.stderr.strip()}")
    print(f"submitted job {proc.stdout.strip()} ({path})")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "slurm":
        print("usage: python -m pretrain.launch slurm [cluster=NAME] [overrides...] [--dry-run] [--output FILE]",
              file=sys.stderr)
        return 2
    with user_errors("launch", argv):
        return slurm(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
