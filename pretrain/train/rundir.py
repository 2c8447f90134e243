"""The run directory (and ``checkpoint.dir``) must be one directory every node sees: ``check_shared``.

On a multi-node job every rank writes checkpoints and rank 0 writes logs into the run directory,
and a resume reads them back on whichever node the rank lands. A directory on a node-local disk
would give each node its own half of every checkpoint. So before the data or the model is built,
the first process on each node (``LOCAL_RANK`` 0) writes a marker named with a token drawn by rank 0,
and each of them lists the directory: a node that misses another's marker does not share it. The
markers are removed again; a one-node job skips the check.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from pretrain.errors import UserError

MARKER = ".shared-check"


class RunDirError(UserError):
    """The run directory or checkpoint directory is not the same directory on every node."""


def one_node() -> bool:
    """True when the launcher put every rank on this node: torchrun's LOCAL_WORLD_SIZE is the world
    size, or the Slurm allocation has one node. The same answer on every rank."""
    env, world = os.environ, os.environ.get("WORLD_SIZE", "1")
    return world == "1" or env.get("LOCAL_WORLD_SIZE") == world or env.get("SLURM_NNODES") == "1"


def _marker(directory: Path, token: str) -> Path:
    return directory / f"{MARKER}-{token}-{dist.get_rank()}"


def _write(directory: Path, token: str) -> Optional[str]:
    """This node's marker (its hostname inside); the problem, if it cannot be written."""
    try:
        if dist.get_rank() == 0:
            directory.mkdir(parents=True, exist_ok=True)
        _marker(directory, token).write_text(socket.gethostname())
    except OSError as err:
        return f"cannot write there ({err.strerror or err})"
    return None


def _look(directory: Path, token: str, problem: Optional[str]) -> dict:
    """What this node sees: {"node", "rank", "seen" (the ranks whose markers are there), "problem"}."""
    seen = []
    if problem is None:
        try:
            seen = [int(p.name.rsplit("-", 1)[1]) for p in directory.glob(f"{MARKER}-{token}-*")]
        except OSError as err:
            problem = f"cannot list it ({err.strerror or err})"
    return {"node": socket.gethostname(), "rank": dist.get_rank(), "seen": seen, "problem": problem}


def check_shared(directory: Path, what: str) -> None:
    """Raise RunDirError on every rank unless every node sees the same ``directory``. Collective.

    ``what`` names the setting in the message (``hydra.run.dir``, ``checkpoint.dir``)."""
    if one_node():
        return
    directory = Path(directory)
    box = [secrets.token_hex(8)]
    dist.broadcast_object_list(box, src=0)
    token, leader = box[0], int(os.environ.get("LOCAL_RANK", "0")) == 0
    problem = _write(directory, token) if leader else None
    dist.barrier()  # every marker is written before any node looks
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, _look(directory, token, problem) if leader else None)
    if leader and problem is None:  # every node has looked: no litter
        _marker(directory, token).unlink(missing_ok=True)
    nodes = [r for r in reports if r is not None]
    leaders = sorted(r["rank"] for r in nodes)
    blind = [r for r in nodes if r["problem"] or sorted(r["seen"]) != leaders]
    if not blind:
        return
    by_rank = {r["rank"]: r["node"] for r in nodes}
    lines = []
    for r in blind:
        missing = [by_rank[k] for k in leaders if k not in r["seen"] and k != r["rank"]]
        why = r["problem"] or (f"does not see the files {', '.join(missing)} wrote there" if missing
                               else "does not see the file it wrote there")
        lines.append(f"  - node {r['node']} (rank {r['rank']}): {why}")
    raise RunDirError(
        f"{what}={directory} is not one directory shared by the {len(nodes)} nodes of this job:\n"
        + "\n".join(lines)
        + f"\nEvery rank writes its checkpoint shards there and resumes from them: set {what} to a directory on a "
        "filesystem every node mounts at the same path (NFS, Lustre, GPFS; under Slurm, cluster.runs_dir)"
    )


def check_run_dirs(run_dir: Path, checkpoint_dir: Optional[str]) -> None:
    """The run directory, and ``checkpoint.dir`` when it is set elsewhere, shared by every node. Collective."""
    check_shared(run_dir, "hydra.run.dir")
    if checkpoint_dir:
        check_shared(Path(checkpoint_dir), "checkpoint.dir")
