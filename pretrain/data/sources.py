"""Source resolution, validation and reading: built-in corpora or local text/JSONL/Parquet files.

Local files are read with Hugging Face ``datasets`` (offline): ``text`` files are one document
per file, JSONL and Parquet one document per record (``text_field``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, List, Tuple

from pretrain.data.config import SourceConfig
from pretrain.data.corpus import get_builtin

Doc = Tuple[str, str]

_EXT_FORMAT = {".txt": "text", ".md": "text", ".rst": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
FORMATS = ("auto", "text", "jsonl", "parquet", "builtin")


class DataConfigError(ValueError):
    """A data config or its input is wrong; the message names the key and the fix."""


def is_builtin(src: SourceConfig) -> bool:
    return src.format == "builtin" or str(src.path).startswith("builtin:")


def _builtin_name(src: SourceConfig) -> str:
    return str(src.path).removeprefix("builtin:")


def resolve_path(src: SourceConfig, root: str | None) -> Path:
    p = Path(os.path.expanduser(str(src.path)))
    return p if p.is_absolute() or root is None else Path(os.path.expanduser(root)) / p


def source_files(src: SourceConfig, root: str | None = None) -> Tuple[str, List[Path]]:
    """(format, files) of a source; raises DataConfigError for missing or unreadable input."""
    if is_builtin(src):
        try:
            corpus = get_builtin(_builtin_name(src))
            return "builtin", corpus.files()
        except (ValueError, FileNotFoundError) as e:
            raise DataConfigError(f"data.sources[{src.name}].path: {e}") from None
    if src.format not in FORMATS:
        raise DataConfigError(f"data.sources[{src.name}].format={src.format!r}: choose one of {FORMATS}")
    path = resolve_path(src, root)
    if not path.exists():
        hint = "" if root or Path(str(src.path)).is_absolute() else " (a relative path: set data.root to its folder)"
        raise DataConfigError(f"data.sources[{src.name}].path: {path} does not exist{hint}")
    if path.is_dir():
        exts = _EXT_FORMAT if src.format == "auto" else [e for e, f in _EXT_FORMAT.items() if f == src.format]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in exts)
    else:
        files = [path]
    if not files:
        raise DataConfigError(f"data.sources[{src.name}].path: no text/JSONL/Parquet files under {path}")
    formats = {src.format if src.format != "auto" else _EXT_FORMAT.get(f.suffix) for f in files}
    if None in formats or len(formats) > 1:
        raise DataConfigError(
            f"data.sources[{src.name}]: cannot infer one format from {sorted({f.suffix for f in files})}; "
            f"set format to one of text|jsonl|parquet"
        )
    fmt = formats.pop()
    if fmt in ("jsonl", "parquet"):
        _check_text_field(src, fmt, files[0])
    return fmt, files


def _check_text_field(src: SourceConfig, fmt: str, first: Path) -> None:
    """Peek at the first record so a wrong text_field fails before any work starts."""
    if fmt == "jsonl":
        with open(first, encoding="utf-8", errors="replace") as f:
            line = next((ln for ln in f if ln.strip()), None)
        if line is None:
            return
        try:
            keys = list(json.loads(line))
        except (json.JSONDecodeError, TypeError) as e:
            raise DataConfigError(f"data.sources[{src.name}]: {first} is not JSON lines ({e})") from None
    else:
        import pyarrow.parquet as pq

        keys = pq.read_schema(first).names
    if src.text_field not in keys:
        raise DataConfigError(
            f"data.sources[{src.name}].text_field={src.text_field!r} is not a field of {first} "
            f"(fields: {keys}); set text_field to the one holding the text"
        )


def fingerprint(src: SourceConfig, root: str | None = None) -> list:
    """What identifies a source's input for the cache: each file's path, size and mtime."""
    _, files = source_files(src, root)
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def read_source(src: SourceConfig, root: str | None = None) -> Iterator[Doc]:
    """Yield (doc_id, text) in a deterministic order; invalid UTF-8 becomes U+FFFD."""
    fmt, files = source_files(src, root)
    if fmt == "builtin":
        docs = get_builtin(_builtin_name(src)).read()
    else:
        docs = _read_hf(src, fmt, files)
    for i, doc in enumerate(docs):
        if src.max_docs is not None and i >= src.max_docs:
            break
        yield doc


def _read_hf(src: SourceConfig, fmt: str, files: List[Path]) -> Iterator[Doc]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    data_files = [str(f) for f in files]
    if fmt == "text":
        kw = dict(sample_by="document", encoding_errors="replace")
        ds = datasets.load_dataset("text", data_files=data_files, split="train", **kw)
        field = "text"
    else:
        ds = datasets.load_dataset("json" if fmt == "jsonl" else "parquet", data_files=data_files, split="train")
        field = src.text_field
        if field not in ds.column_names:
            raise DataConfigError(
                f"data.sources[{src.name}].text_field={field!r} is not a field (fields: {ds.column_names})"
            )
    for i, row in enumerate(ds.select_columns([field])):
        text = row[field]
        if isinstance(text, str):
            yield f"{i}", text
