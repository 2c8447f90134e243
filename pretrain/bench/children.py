"""Child processes of the GPU benchmark and smoke test: their environment, and a run logged to a file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the source checkout (site-packages for an installed wheel)
GROUP_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",  # never
                   "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")  # inherited by a child (tests/harness.py)


def child_env(cuda: bool) -> dict:
    """The environment of a child: no process-group coordinates, offline; DeepSpeed on CPU without CUDA."""
    drop = (*GROUP_VARIABLES, "PRETRAIN_KERNELS_BACKEND", "TRITON_INTERPRET")  # the kernel check sets its own
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if (REPO / "pyproject.toml").is_file():  # a source checkout: its code, not another install
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if not cuda:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    elif env.get("DS_ACCELERATOR") == "cpu":  # a CPU CI setting would defeat the GPU check
        del env["DS_ACCELERATOR"]
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def run_logged(cmd: list, cuda: bool, cwd: Path, timeout: int, log_file: Path) -> tuple[int, str]:
    """Run ``cmd`` (a child's environment), its output into ``log_file``; (status, output); 124: timed out."""
    try:
        proc = subprocess.run(cmd, env=child_env(cuda), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, text = 124, text + f"\n[{cmd[2]}] timed out after {timeout} s\n"
    log_file.write_text(f"$ {' '.join(cmd)}\n{text}")
    return rc, text
