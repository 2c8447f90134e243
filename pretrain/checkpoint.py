"""Save and resume everything needed to continue a run exactly.

DeepSpeed writes the weights and optimizer state of each rank (ZeRO partitions, pipeline layers)
under ``<dir>/<tag>/`` and the ``latest`` pointer. Beside them go the trainer state (step, tokens,
consumed samples: the data position) and each rank's RNG streams.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from pretrain.engine import TrainEngine

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Runtime counters; never part of the config."""

    step: int = 0
    tokens: int = 0
    consumed_samples: int = 0


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _rng_path(directory: Path, tag: str) -> Path:
    return directory / tag / "rng" / f"rank{dist.get_rank():05d}.pt"


def save(engine: TrainEngine, directory: str, state: TrainState, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    directory = Path(directory)
    tag = tag_for(state.step)
    engine.save(str(directory), tag, client_state={"train_state": asdict(state)})
    rng = _rng_path(directory, tag)
    rng.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}, rng)
    dist.barrier()
    if dist.get_rank() == 0 and keep_last > 0:
        for old in sorted(p for p in directory.glob("step*") if p.is_dir())[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return tag


def latest_tag(directory: str) -> Optional[str]:
    pointer = Path(directory) / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def resume(engine: TrainEngine, directory: str) -> Optional[TrainState]:
    """Load the newest checkpoint in ``directory`` into the engine; None if there is none."""
    tag = latest_tag(directory)
    if tag is None:
        return None
    client_state = engine.load(directory, tag)
    if client_state is None or "train_state" not in client_state:
        raise RuntimeError(
            f"checkpoint {directory}/{tag} has no trainer state; it was not written by pretrain. "
            "Point checkpoint.resume at a pretrain checkpoint directory or set checkpoint.resume=never"
        )
    rng = _rng_path(Path(directory), tag)
    if rng.is_file():
        states = torch.load(rng, weights_only=False)
        torch.set_rng_state(states["torch"])
        get_cuda_rng_tracker().set_states(states["tracker"])
    else:
        log.warning("no RNG state for this rank in %s/%s (saved at another layout?); dropout streams restart", directory, tag)
    return TrainState(**client_state["train_state"])
