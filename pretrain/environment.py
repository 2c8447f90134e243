"""What the launcher told this process: its rank and the world size. Import-light (no torch).

Under torchrun the environment already holds RANK / WORLD_SIZE; Slurm tasks started without torchrun
take them from Slurm's variables (``adopt_slurm_tasks``).
"""

from __future__ import annotations

import os
import subprocess


def adopt_slurm_tasks() -> None:
    """Slurm tasks started without torchrun (``srun python -m pretrain.train``, or a Hydra sweep
    through hydra-submitit-launcher) take their rank and world size from Slurm; the rendezvous is
    the job's first node, on a port derived from the job id. A no-op under torchrun."""
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return
    first_node = subprocess.run(
        ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    env.update(
        RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
        MASTER_ADDR=first_node, MASTER_PORT=str(20000 + int(env["SLURM_JOB_ID"]) % 20000),
    )


def world_size_from_env() -> int:
    adopt_slurm_tasks()
    return int(os.environ.get("WORLD_SIZE", "1"))


def serialize_device_connections(tensor_parallel: int) -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS=1 for TP > 1, before anything creates a CUDA context.

    With one hardware queue the GPU runs kernels in launch order, so the TP all-reduce megatron-core
    issues before the weight-gradient matmul starts first and overlaps it (Megatron-LM's rule). A
    value the user exported is kept; without CUDA the variable means nothing.
    """
    if tensor_parallel > 1:
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
