"""The cluster settings a Slurm job is rendered from: ``pretrain/conf/cluster/<NAME>.yaml`` plus
``cluster.KEY=VALUE`` overrides, checked against ``ClusterConfig`` (unknown keys, wrong types and values
that cannot be rendered safely are refused, naming the key), and the quoting every rendered value gets."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config import CONF_DIR
from pretrain.errors import UserError
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
    # A planner catalogue name (python -m pretrain.plan --help): the launcher checks the plan's memory on
    # it before queuing (planner.check / planner.margin), as the job itself does once it runs.
    gpu: Optional[str] = None
    procs_per_node: Optional[int] = None  # default: gpus_per_node
    cpus_per_task: int = 1
    mem: Optional[str] = None  # --mem, e.g. 500G; null or 0: not requested
    time: str = "01:00:00"  # --time: [days-]hours:minutes:seconds, minutes, ...
    signal_seconds: int = 300  # USR1 this long before the time limit (0-65535)
    shutdown_timeout: int = 240  # seconds torchrun gives its workers to save before SIGKILL
    rdzv_port: int = 29500  # 1-65535
    python: str = "python"  # one executable (a path is fine, spaces included), run as is
    workdir: Optional[str] = None  # default: the directory you submit from
    runs_dir: str = "runs"  # on a filesystem every node mounts; taken literally (~ is expanded); no % or backslash
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
