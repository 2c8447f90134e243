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

The cluster file and its overrides are checked against ``ClusterConfig``: unknown keys, wrong types
and values that cannot be rendered safely are refused (exit 2) naming the key. Every value that a
shell reads is shlex-quoted (``setup`` lines are the one place for shell code), ``#SBATCH`` values are
quoted as sbatch reads them, and secret-looking ``env`` entries are passed by name only.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config import CONF_DIR
from pretrain.errors import UserError, composing, user_errors
from pretrain.redact import is_secret_name

CONF = Path(CONF_DIR)
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"

# What each rendered value may look like. Everything that reaches a shell line is also shlex-quoted.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SLURM_NAMES = re.compile(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*")  # partition (a list), account, qos
JOB_NAME = re.compile(r"[A-Za-z0-9_.+-]+")  # also a file name: <runs_dir>/<job>-<id>
SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|unlimited|infinite", re.IGNORECASE)
SLURM_MEM = re.compile(r"\d+[KMGT]?", re.IGNORECASE)
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SBATCH_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
ENV_REF = re.compile(r"\$\{oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}")


class ClusterError(UserError):
    """A cluster setting (pretrain/conf/cluster/<name>.yaml or cluster.KEY=VALUE) that cannot be rendered safely."""


@dataclass
class ClusterConfig:
    """pretrain/conf/cluster/<name>.yaml; ``cluster.KEY=VALUE`` overrides it. Unknown keys and wrong types are refused."""

    name: str = MISSING
    partition: Optional[str] = None  # --partition (a comma-separated list is fine)
    account: Optional[str] = None  # --account
    qos: Optional[str] = None  # --qos
    job_name: Optional[str] = None  # default: <model>-<parallel plan>; letters, digits, _ . + -
    gpus_per_node: int = 0
    procs_per_node: Optional[int] = None  # default: gpus_per_node
    cpus_per_task: int = 1
    mem: Optional[str] = None  # --mem, e.g. 500G; null or 0: not requested
    time: str = "01:00:00"  # --time: [days-]hours:minutes:seconds, minutes, ...
    signal_seconds: int = 300  # USR1 this long before the time limit (0-65535)
    shutdown_timeout: int = 240  # seconds torchrun gives its workers to save before SIGKILL
    rdzv_port: int = 29500  # 1-65535
    python: str = "python"  # one executable (a path is fine, spaces included), run as is
    workdir: Optional[str] = None  # default: the directory you submit from
    runs_dir: str = "runs"  # taken literally (~ is expanded); no % or backslash
    setup: List[str] = field(default_factory=list)  # shell lines, verbatim: the one place for shell code
    srun_args: List[str] = field(default_factory=list)  # each one argument, quoted (no $VAR expansion)
    # NAME: value, exported in the script. null, or any NAME that looks secret (KEY, TOKEN, SECRET,
    # PASSWORD): passed from the submitting shell with sbatch --export, never written into the script.
    env: Dict[str, Optional[str]] = field(default_factory=dict)
    extra_sbatch: List[str] = field(default_factory=list)  # verbatim #SBATCH lines, e.g. --exclusive

    @property
    def passthrough(self) -> list[str]:
        """Environment variables the job takes from the submitting shell (names only)."""
        return [k for k, v in self.env.items() if v is None or is_secret_name(k)]


VALID_KEYS = [f.name for f in fields(ClusterConfig)]


def compose_training(overrides: list[str]) -> DictConfig:
    """The training config exactly as ``pretrain.train`` would compose it from ``overrides``."""
    from hydra import compose, initialize_config_dir

    from pretrain.config import register_configs

    register_configs()
    with composing("training config"), initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)  # Hydra's message names the override


def _omegaconf_problem(err: OmegaConfBaseException, where: str, in_file: bool = False) -> ClusterError:
    """An OmegaConf merge/resolve error as a message naming the key (``where``: the override or file)."""
    full_key = getattr(err, "full_key", None) or ""
    key = f"cluster.{full_key}" if full_key else "cluster"
    msg = str(getattr(err, "msg", err)).split("\n")[0]
    if type(err).__name__ == "ConfigKeyError":
        return ClusterError(f"{where}: {key} is not a cluster setting; valid keys: {', '.join(VALID_KEYS)}")
    return ClusterError(f"{where}: {key}: {msg}" if in_file or not where.startswith(key) else f"{where}: {msg}")


def _parse_override(item: str) -> DictConfig:
    """``KEY=VALUE`` (without the ``cluster.`` prefix) as a config; a value YAML cannot parse stays a string."""
    if "=" not in item:
        raise ClusterError(f"cluster.{item}: expected cluster.KEY=VALUE; valid keys: {', '.join(VALID_KEYS)}")
    key, value = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ClusterError(f"cluster.{item}: expected cluster.KEY=VALUE; valid keys: {', '.join(VALID_KEYS)}")
    try:
        return OmegaConf.from_dotlist([item])
    except Exception:  # e.g. a value starting with a backtick: not YAML, so a plain string
        parsed = OmegaConf.create()
        OmegaConf.update(parsed, key, value, force_add=True)
        return parsed


def load_cluster(name: str, overrides: list[str]) -> ClusterConfig:
    """pretrain/conf/cluster/<name>.yaml merged with the overrides into the typed schema, then checked."""
    known = sorted(p.stem for p in (CONF / "cluster").glob("*.yaml"))
    path = CONF / "cluster" / f"{name}.yaml"
    if not JOB_NAME.fullmatch(name) or not path.is_file():
        raise ClusterError(f"cluster={name}: no {path}; choose one of {known} (or add that file)")
    merged = OmegaConf.structured(ClusterConfig)
    try:
        from_file = OmegaConf.load(path)
    except Exception as err:
        raise ClusterError(f"{path}: not valid YAML: {err}") from err
    try:
        merged = OmegaConf.merge(merged, from_file)
    except OmegaConfBaseException as err:
        raise _omegaconf_problem(err, str(path), in_file=True) from err
    for item in overrides:
        try:
            merged = OmegaConf.merge(merged, _parse_override(item))
        except OmegaConfBaseException as err:
            raise _omegaconf_problem(err, f"cluster.{item}") from err
    # Secret-looking env entries: never resolved here, so their values cannot reach the script.
    for key in list(merged.env.keys()):
        if not is_secret_name(key) or not ENV_NAME.fullmatch(str(key)):
            continue  # (a bad name is reported with the other problems)
        raw = merged.env._get_node(key)._value()
        ref = ENV_REF.fullmatch(raw) if isinstance(raw, str) else None
        if raw not in (None, "") and not (ref and ref.group(1) == key):
            raise ClusterError(
                f"cluster.env.{key}: looks like a secret (KEY/TOKEN/SECRET/PASSWORD), so its value must not be in "
                f"the config or on the command line: set cluster.env.{key}=null and `export {key}=...` in the "
                "shell you submit from (the job gets it through sbatch --export, never in the script)"
            )
        merged.env[key] = None
    try:
        cluster = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_problem(err, f"cluster={name}", in_file=True) from err
    cluster.runs_dir = os.path.expanduser(cluster.runs_dir) if cluster.runs_dir else cluster.runs_dir
    cluster.workdir = os.path.expanduser(cluster.workdir) if cluster.workdir else cluster.workdir
    problems = cluster_problems(cluster)
    if problems:
        raise ClusterError(
            f"cluster={name}: invalid settings ({path} or cluster.KEY=VALUE):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return cluster


def cluster_problems(c: ClusterConfig) -> list[str]:
    """Every setting that could not be rendered safely, each naming its key and the fix."""
    problems = []

    def text(key: str, value: Any, pattern: Optional[re.Pattern] = None, hint: str = "") -> None:
        if value is None:
            return
        if not isinstance(value, str):
            problems.append(f"cluster.{key}={value!r}: must be a string")
        elif CONTROL.search(value):
            problems.append(f"cluster.{key}={value!r}: no newlines or control characters")
        elif pattern is not None and not pattern.fullmatch(value):
            problems.append(f"cluster.{key}={value!r}: {hint}")

    def number(key: str, low: int, high: Optional[int] = None, optional: bool = False) -> None:
        value = getattr(c, key)
        if value is None and optional:
            return
        if not isinstance(value, int) or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            problems.append(f"cluster.{key}={value!r}: must be an integer {bound}")

    text("name", c.name)
    for key in ("partition", "account", "qos"):
        text(key, getattr(c, key), SLURM_NAMES, "letters, digits, _ . + - (comma-separated for several)")
    text("job_name", c.job_name, JOB_NAME, "letters, digits, _ . + - only (it names files and the run dir)")
    number("gpus_per_node", 0)
    number("procs_per_node", 1, optional=True)
    number("cpus_per_task", 1)
    text("mem", c.mem, SLURM_MEM, "a size such as 500G, 64000M or 0")
    text("time", c.time, SLURM_TIME, "a Slurm time: [days-]hours:minutes:seconds, minutes, or UNLIMITED")
    number("signal_seconds", 0, 65535)
    number("shutdown_timeout", 0)
    number("rdzv_port", 1, 65535)
    text("python", c.python)
    if not c.python:
        problems.append("cluster.python: empty; give the interpreter (e.g. python or /path/to/.venv/bin/python)")
    text("workdir", c.workdir)
    text("runs_dir", c.runs_dir)
    if not c.runs_dir:
        problems.append("cluster.runs_dir: empty; give a directory (e.g. runs)")
    elif "%" in c.runs_dir or "\\" in c.runs_dir:
        problems.append(f"cluster.runs_dir={c.runs_dir!r}: no % or backslash (Slurm reads them in --output)")
    for i, line in enumerate(c.setup):
        text(f"setup[{i}]", line)
    for i, arg in enumerate(c.srun_args):
        text(f"srun_args[{i}]", arg)
    for i, line in enumerate(c.extra_sbatch):
        text(f"extra_sbatch[{i}]", line, re.compile(r"-.*"), "an sbatch option, starting with -")
    for key, value in c.env.items():
        if not ENV_NAME.fullmatch(str(key)):
            problems.append(f"cluster.env.{key}: not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
        elif value is not None and not isinstance(value, str):
            problems.append(f"cluster.env.{key}: must be a string or null, not {type(value).__name__}")
        else:
            text(f"env.{key}", value)
    return problems


def sbatch_quote(value: str) -> str:
    """A value on an ``#SBATCH`` line as sbatch reads it (it splits at spaces, # starts a comment)."""
    if SBATCH_PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
    """(nodes, processes per node) for the config's tp x pp x dp processes."""
    world = cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.data
    per_node = cluster.procs_per_node or cluster.gpus_per_node
    if not per_node:
        raise ClusterError(f"cluster {cluster.name}: set cluster.gpus_per_node or cluster.procs_per_node")
    if world % per_node and world > per_node:
        raise ClusterError(
            f"the plan needs {world} processes (tensor x pipeline x data), not a multiple of "
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

    validate(cfg, cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.data)  # ConfigError: exit 2
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
