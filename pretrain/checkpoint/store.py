"""Save and resume everything needed to continue a run exactly, without ever trusting a half-written file.

DeepSpeed writes the weights and optimizer state of each rank (ZeRO partitions, pipeline layers);
beside them go the trainer state (step, tokens, consumed samples: the data position) and each rank's
RNG streams. A save is a commit in three moves:

1. every rank writes into ``<dir>/.tmp/<tag>/`` (a crash here leaves only ``.tmp``, cleared next time);
2. the ranks checksum the files between them and rank 0 writes ``manifest.json`` (size and sha256 of
   every file), then renames the folder to ``<dir>/<tag>`` (atomic on one file system);
3. rank 0 rewrites ``<dir>/latest`` (DeepSpeed's pointer, for its tools) through a rename, then drops all
   but the newest ``keep_last`` checkpoints.

On resume the newest ``step*`` folder whose files match its manifest wins; a damaged or incomplete
one is reported and skipped in favour of the one before. A checkpoint saved at another layout
(tp, pp, dp, ZeRO stage or precision; the manifest records it) is resharded (``reshard.py``).
Checkpoints live on a file system every rank sees (multi-node runs need a shared one).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from pretrain.checkpoint import reshard
from pretrain.checkpoint import safeload
from pretrain.engine.core import TrainEngine
from pretrain.errors import CheckpointError
from pretrain.model import weights
from pretrain.checkpoint.manifest import MANIFEST, checkpoints, compare, hashes, read_expected

log = logging.getLogger(__name__)

STAGING = ".tmp"


@dataclass
class TrainState:
    """Runtime counters, never part of the config, and the state of the training hooks (``train.hooks``)."""

    step: int = 0
    tokens: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0  # updates skipped for a non-finite or spiking loss, over the whole run
    consecutive_skips: int = 0
    hooks: dict = field(default_factory=dict)  # {hook name: its state_dict}, written at each save

    @classmethod
    def from_dict(cls, values: dict) -> "TrainState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _rng_file(tag_dir: Path) -> Path:
    return tag_dir / "rng" / f"rank{dist.get_rank():05d}.pt"


def _files(tag_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _shared_hashes(tag_dir: Path, names: list[str]) -> dict:
    """{name: size and sha256}, the hashing split over the ranks. Collective."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = hashes(tag_dir, names[rank::world])
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(engine: TrainEngine, directory: str, state: TrainState, keep_last: int, before_commit=None) -> str:
    """Write and commit a checkpoint of ``state``. Collective: every rank calls it. Returns its folder.

    ``before_commit(step)`` runs once the files are written, before any is checksummed (fault tests).
    """
    root = Path(directory)
    tag = tag_for(state.step)
    staging_root = root / STAGING
    if dist.get_rank() == 0:
        shutil.rmtree(staging_root, ignore_errors=True)  # leftovers of a save that died
        staging_root.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    staged = staging_root / tag
    engine.save(str(staging_root), tag, client_state={"train_state": asdict(state)})
    rng = _rng_file(staged)
    rng.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}, rng)
    dist.barrier()
    if before_commit is not None:
        before_commit(state.step)

    names = _files(staged) if dist.get_rank() == 0 else None
    box = [names]
    dist.broadcast_object_list(box, src=0)
    hashes = _shared_hashes(staged, box[0])
    final = root / tag
    if dist.get_rank() == 0:
        broken = {n: h["error"] for n, h in hashes.items() if "error" in h}
        if broken:
            raise OSError(f"checkpoint {staged}: could not read back {broken}")
        manifest = {
            "tag": tag, "train_state": asdict(state), "world_size": dist.get_world_size(), "layout": engine.layout,
            "shapes": engine.shapes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": hashes,
        }
        _write_atomic(staged / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        if final.exists():  # the same step saved again (e.g. a stop request at a checkpoint step)
            shutil.rmtree(final)
        os.rename(staged, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", tag)  # last: DeepSpeed's tools follow it
        recovery = staging_root / "zero_to_fp32.py"
        if recovery.is_file():
            os.replace(recovery, root / recovery.name)
        if keep_last > 0:
            for old in checkpoints(directory)[:-keep_last]:
                shutil.rmtree(root / old, ignore_errors=True)
        shutil.rmtree(staging_root, ignore_errors=True)
    dist.barrier()
    return str(final)


def verify(tag_dir: Path) -> Optional[str]:
    """Why the checkpoint in ``tag_dir`` cannot be trusted, or None if every file matches its manifest.

    Collective: the hashing is split over the ranks, and every rank gets the same answer.
    """
    box = list(read_expected(tag_dir)) if dist.get_rank() == 0 else [None, None]
    dist.broadcast_object_list(box, src=0)
    problem, expected = box
    if problem is not None:
        return problem
    return compare(expected, _shared_hashes(tag_dir, sorted(expected)))


def newest_valid(directory: str) -> Optional[str]:
    """The newest checkpoint in ``directory`` that verifies; reports (rank 0) each one skipped. Collective."""
    tags = checkpoints(directory)
    reasons = []
    for tag in reversed(tags):
        problem = verify(Path(directory) / tag)
        if problem is None:
            return tag
        reasons.append(f"{tag}: {problem}")
        if dist.get_rank() == 0:
            log.warning("checkpoint %s/%s is damaged or incomplete and is skipped: %s", directory, tag, problem)
    if tags:
        raise CheckpointError(
            f"no checkpoint in {directory} is intact ({'; '.join(reasons)}). "
            "Restore one, point checkpoint.dir elsewhere, or set checkpoint.resume=never to start afresh"
        )
    return None


def resume(engine: TrainEngine, directory: str, tag: Optional[str] = None) -> Optional[TrainState]:
    """Load checkpoint ``tag`` of ``directory`` (default: the newest intact one) into the engine.

    None if there is no checkpoint. A named tag that fails its manifest is refused. Collective.
    """
    if tag is None:
        tag = newest_valid(directory)
        if tag is None:
            return None
    else:
        problem = verify(Path(directory) / tag)
        if problem is not None:
            raise CheckpointError(f"checkpoint {directory}/{tag} is damaged: {problem}. Name another checkpoint "
                                  "in checkpoint.resume, or its run directory to take the newest intact one")
    manifest = json.loads((Path(directory) / tag / MANIFEST).read_text())
    shapes, saved = manifest.get("shapes"), manifest.get("layout")
    if not isinstance(shapes, (dict, type(None))) or not isinstance(saved, (dict, type(None))):
        raise CheckpointError(f"{directory}/{tag}/{MANIFEST}: its 'shapes' and 'layout' entries are not tables; "
                              "the manifest was not written by pretrain")
    if shapes is not None:  # refuse another model's checkpoint before DeepSpeed's load fails on it
        weights.check_fits(shapes, engine.shapes, Path(directory) / tag, reshard.ReshardError, reshard.FIT_ADVICE)
    if saved is not None:
        saved = {"context": 1, **saved}  # saved before context parallelism existed
    if saved is not None and saved != engine.layout:
        return _resume_resharded(engine, Path(directory) / tag, saved)
    client_state = engine.load(directory, tag)
    if client_state is None or "train_state" not in client_state:
        raise CheckpointError(
            f"checkpoint {directory}/{tag} has no trainer state; it was not written by pretrain. "
            "Point checkpoint.resume at a pretrain checkpoint directory or set checkpoint.resume=never"
        )
    rng = _rng_file(Path(directory) / tag)
    if rng.is_file():
        states = safeload.load(rng)
        torch.set_rng_state(states["torch"])
        get_cuda_rng_tracker().set_states(states["tracker"])
    else:
        log.warning("no RNG state for this rank in %s/%s (saved at another layout?); dropout streams restart", directory, tag)
    return TrainState.from_dict(client_state["train_state"])


def _resume_resharded(engine: TrainEngine, tag_dir: Path, saved: dict) -> TrainState:
    """Resume from a checkpoint of another layout through its universal form. Collective."""
    if dist.get_rank() == 0:
        changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in engine.layout.items() if saved.get(k) != v)
        log.warning("checkpoint %s was saved at another layout (%s): resharding its weights and optimizer state",
                    tag_dir, changed)
    with reshard.malformed(tag_dir):
        meta = reshard.load_universal(engine, reshard.ensure_universal(tag_dir))
    state = TrainState.from_dict(meta["train_state"])
    engine.restore_counters(state.step, state.consumed_samples)
    if dist.get_rank() == 0:
        log.info("RNG streams restart after a layout change (only dropout draws differ from an unchanged run)")
    return state
