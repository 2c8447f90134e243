"""Content-addressed stage outputs.

A stage's output lives in ``<cache_dir>/<stage>/<key>/``, where the key hashes everything that
determines it (its config and its inputs' keys). A stage is built in a partial sibling folder and
renamed into place when complete (tasks.publish), so a crash mid-stage never leaves a folder a
later run would read; ``manifest.json`` is written last, inside the partial folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

MANIFEST = "manifest.json"


def make_key(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stage_dir(cache_dir: str | Path, stage: str, key: str) -> Path:
    return Path(cache_dir) / stage / key


def is_done(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def read_manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)
