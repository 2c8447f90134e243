"""Content-addressed stage outputs.

A stage's output lives in ``<cache_dir>/<stage>/<key>/``, where the key hashes everything that
determines it (its config and its inputs' keys). A stage is built in a temporary sibling folder
and renamed into place when complete, so a crash mid-stage never leaves a folder a later run
would read; ``manifest.json`` is written last, inside the temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, List, Tuple

Doc = Tuple[str, str]
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


@contextmanager
def building(path: Path) -> Iterator[Tuple[Path, dict]]:
    """Yield (tmp_dir, manifest); on success write the manifest and rename tmp_dir to path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    manifest: dict = {}
    try:
        yield tmp, manifest
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        try:
            os.rename(tmp, path)
        except OSError:
            if not is_done(path):  # someone else finished it meanwhile: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_docs(path: Path, docs: Iterable[Doc]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False))
            f.write("\n")


def read_docs(path: Path) -> List[Doc]:
    with open(path, encoding="utf-8") as f:
        return [(d["id"], d["text"]) for d in map(json.loads, f)]


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)
