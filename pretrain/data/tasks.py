"""Stages as tasks: a stage's work is cut into units that run independently, in any order and on
any executor (``executors.py``), each writing its own output files and a small JSON result (the
datatrove step that runs a task, and the tasks' bodies, are in ``stage_tasks.py``).

A stage is built in a stable partial folder, ``<cache>/<stage>/.<key>.partial/``, so a data job
killed mid-stage and run again redoes only the tasks that had not finished (datatrove's completion
markers, kept under ``<cache>/_logs/<stage>/<key>/`` with each task's log); the driver publishes
the folder under its key (one rename) once every task is done. Outputs depend on the units and the
config only, never on the executor, the number of workers or the order tasks ran in.

Chunked stages (decontam, tokenize+write) cut every upstream part file into byte ranges: a chunk
holds the lines that *start* inside its range, so chunks cover each file exactly once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

from pretrain.data.file_parts import even_ranges, lines_in_range

Doc = Tuple[str, str]
RESULTS = "_results"
PART = "part-{:05d}.jsonl"


@dataclass(frozen=True)
class Chunk:
    """The lines of ``root/path`` that start at byte offsets in [start, end)."""

    source: str
    path: str  # relative to the cache root
    start: int
    end: int


def chunks_of(root: Path, parts: Dict[str, List[Path]], target_bytes: int) -> List[Chunk]:
    """Every part file cut into ~``target_bytes`` ranges, sources and parts in order."""
    out = []
    for source, files in parts.items():
        for f in files:
            out += [Chunk(source, str(f.relative_to(root)), a, b) for a, b in even_ranges(f.stat().st_size, target_bytes)]
    return out


def read_chunk(root: Path, chunk: Chunk) -> Iterator[Doc]:
    with open(root / chunk.path, "rb") as f:
        for line in lines_in_range(f, chunk.start, chunk.end):
            d = json.loads(line)
            yield d["id"], d["text"]


def write_part(path: Path, docs) -> Tuple[int, int]:
    """Write documents as JSONL (published by rename); returns (documents, text bytes)."""
    return write_encoded_part(path, ((i, json.dumps(t, ensure_ascii=False), len(t.encode("utf-8"))) for i, t in docs))


def write_encoded_part(path: Path, docs) -> Tuple[int, int]:
    """write_part of (id, the text as a JSON string, its UTF-8 bytes): the same lines, from text
    encoded earlier (the id must need no escaping)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    n = nbytes = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for doc_id, encoded, size in docs:
            f.write(f'{{"id": {json.dumps(doc_id)}, "text": {encoded}}}\n')
            n += 1
            nbytes += size
    os.replace(tmp, path)
    return n, nbytes


def save_array(path: Path, arr) -> None:
    """Write a NumPy array as .npy (published by rename)."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


@contextlib.contextmanager
def array_file(path: Path, n: int, dtype):
    """``n`` zeros of ``dtype`` as a memory-mapped .npy file to fill, published at ``path`` (by
    rename) when the block ends without an error."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n,)) if n else np.zeros(0, dtype)
    try:
        yield arr
        if n:
            arr.flush()
        else:
            np.save(tmp, arr)
        del arr
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_parts(paths: Sequence[Path]) -> Iterator[Doc]:
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                yield d["id"], d["text"]


def plan_text(units: list, context: dict) -> str:
    return json.dumps({"units": [asdict(u) if hasattr(u, "__dataclass_fields__") else u for u in units],
                       "context": context}, sort_keys=True, default=str)


def prepare_partial(partial: Path, logs: Path, plan: str) -> None:
    """Make ``partial`` (and the tasks' log folder) ready for this plan; a folder left by another
    plan (other units) is discarded with its completion markers, since its tasks are not ours."""
    marker = partial / "plan.json"
    if marker.is_file() and marker.read_text() != plan:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
    if not marker.is_file():
        shutil.rmtree(logs, ignore_errors=True)  # completions without their outputs mean nothing
        partial.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".plan.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(plan)
        os.replace(tmp, marker)


def read_results(partial: Path, n: int) -> List[dict]:
    out = []
    for r in range(n):
        path = partial / RESULTS / f"{r:05d}.json"
        out.append(json.loads(path.read_text()) if path.is_file() else None)
    return out


def publish(partial: Path, final: Path, manifest: dict) -> None:
    """Write the manifest and move the partial folder to its key (atomic); task bookkeeping goes."""
    from pretrain.data.cache import MANIFEST

    shutil.rmtree(partial / RESULTS, ignore_errors=True)
    (partial / "plan.json").unlink(missing_ok=True)
    for stale in partial.rglob(".*.tmp-*"):  # half-written by a task of a killed run (since redone)
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    try:
        os.rename(partial, final)
    except OSError:
        if not (final / MANIFEST).is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another job published the same key meanwhile


# ---- what every task body uses ------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _config(blob: str):
    from pretrain.data.validation import to_config

    return to_config(json.loads(blob))


def config(ctx: dict):
    """The data config a task was given (``ctx["cfg"]``), parsed once per process."""
    return _config(json.dumps(ctx["cfg"], sort_keys=True))


class Counted:
    """Iterate documents, counting them and their UTF-8 bytes."""

    def __init__(self, docs):
        self.docs, self.n, self.nbytes = docs, 0, 0

    def __iter__(self):
        for doc in self.docs:
            self.n += 1
            self.nbytes += len(doc[1].encode("utf-8"))
            yield doc
