"""A checkpoint's manifest: the size and sha256 of every file, and the one gate that checks them.

``checkpoint.save`` writes ``<tag>/manifest.json`` last, before the folder is renamed into place.
Every command that reads a checkpoint checks it first: training's resume through
``checkpoint.newest_valid`` (the hashing split over the ranks), and the one-process commands
(export, generate, reshard) through ``select``, which takes the newest intact checkpoint of a
run, saying on stderr which newer ones it skipped and why, or refuses a named one that is damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional

from pretrain.errors import CheckpointError

MANIFEST = "manifest.json"
TAG_PATTERN = re.compile(r"^step\d{8}$")


def file_hash(path: Path) -> dict:
    """Size and sha256 of a file; also flushes it to disk (fsync works on a read-only descriptor)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def hashes(root: Path, names: list[str]) -> dict:
    """{name: size and sha256, or {"error": why}} for files under ``root``."""
    out = {}
    for name in names:
        try:
            out[name] = file_hash(root / name)
        except OSError as err:
            out[name] = {"error": str(err)}
    return out


def checkpoints(directory) -> list[str]:
    """Committed checkpoint tags in ``directory``, oldest first (not verified)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))


def read_expected(tag_dir: Path) -> tuple[Optional[str], Optional[dict]]:
    """(problem, {file: size and sha256}) from the manifest; checks presence and sizes, not contents."""
    try:
        expected = json.loads((tag_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (an incomplete or pre-manifest checkpoint)", None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        return f"unreadable {MANIFEST} ({type(err).__name__}: {err})", None
    return read_expected_files(tag_dir, expected)


def read_expected_files(root: Path, expected) -> tuple[Optional[str], Optional[dict]]:
    """(problem, expected) for a {file: size and sha256} table of files under ``root``."""
    if not isinstance(expected, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for v in expected.values()
    ):
        return f"unreadable {MANIFEST}: its file table is not {{name: {{size, sha256}}}}", None
    for name, want in expected.items():
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{MANIFEST} names a file outside the checkpoint ({name})", None
        if not path.is_file():
            return f"{name} is missing", None
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['size']}", None
    return None, expected


def compare(expected: dict, actual: dict) -> Optional[str]:
    """Why the files' hashes differ from the manifest's, or None."""
    for name in sorted(expected):
        got = actual[name]
        if "error" in got:
            return f"{name} cannot be read ({got['error']})"
        if got["sha256"] != expected[name]["sha256"]:
            return (f"{name} does not match its checksum (sha256 {got['sha256'][:12]}..., "
                    f"manifest {expected[name]['sha256'][:12]}...)")
    return None


def problem(tag_dir: Path) -> Optional[str]:
    """Why the checkpoint in ``tag_dir`` cannot be trusted, or None. One process."""
    found, expected = read_expected(Path(tag_dir))
    if found is not None:
        return found
    return compare(expected, hashes(Path(tag_dir), sorted(expected)))


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def resolve(path) -> tuple[Path, Optional[str]]:
    """(checkpoints dir, tag or None) for a run dir, its checkpoints dir, or one step folder."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory; pass a run directory, its checkpoints folder or a step folder")
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if TAG_PATTERN.match(path.name):
        return path.parent, path.name
    if checkpoints(path):
        return path, None
    raise CheckpointError(f"{path}: no checkpoints here (no checkpoints/ folder and no step* folders); "
                          "pass a pretrain run directory, its checkpoints folder or a step folder")


def select(ckpt_dir, tag: Optional[str] = None, warn: Callable[[str], None] = _warn) -> str:
    """The tag to read in ``ckpt_dir``: ``tag`` if given and intact, else the newest intact one.

    A named tag that is damaged is refused; without a name, damaged newer checkpoints are skipped
    with the reason (``warn``). CheckpointError when nothing intact is left.
    """
    ckpt_dir = Path(ckpt_dir)
    if tag is not None:
        if not (ckpt_dir / tag).is_dir():
            raise CheckpointError(f"{ckpt_dir / tag}: no such checkpoint (have: {', '.join(checkpoints(ckpt_dir)) or 'none'})")
        why = problem(ckpt_dir / tag)
        if why is not None:
            raise CheckpointError(
                f"checkpoint {ckpt_dir / tag} is damaged: {why}. Name an earlier tag, or leave the tag out to take "
                "the newest intact checkpoint"
            )
        return tag
    tags = checkpoints(ckpt_dir)
    if not tags:
        raise CheckpointError(f"{ckpt_dir}: no checkpoints (step* folders); is this a pretrain run directory?")
    reasons = []
    for candidate in reversed(tags):
        why = problem(ckpt_dir / candidate)
        if why is None:
            if reasons:
                warn(f"using {ckpt_dir / candidate}, the newest intact checkpoint")
            return candidate
        reasons.append(f"{candidate}: {why}")
        warn(f"checkpoint {ckpt_dir / candidate} is damaged or incomplete and is skipped: {why}")
    raise CheckpointError(f"no checkpoint in {ckpt_dir} is intact ({'; '.join(reasons)}). Restore one from a backup")


def find(path, tag: Optional[str] = None) -> tuple[Path, str]:
    """(checkpoints dir, tag) for a run dir, its checkpoints dir or a step folder, after the integrity check.

    Without a tag (in ``tag`` or the path), the newest intact checkpoint, damaged newer ones skipped
    with the reason on stderr; a named tag that is damaged is refused.
    """
    ckpt_dir, named = resolve(path)
    if tag is not None and named is not None and tag != named:
        raise CheckpointError(f"{path} is checkpoint {named}, but --tag {tag} was given; pass one of them")
    return ckpt_dir, select(ckpt_dir, tag or named)
