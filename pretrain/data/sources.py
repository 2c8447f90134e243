"""Source resolution and reading: built-in corpora, local text/JSONL/Parquet files (JSONL and text
also gzip/Zstandard compressed, ``compressed.py``), or a datasets ``save_to_disk`` folder (``hf_disk.py``).

``path`` is a file, a folder (searched recursively for .txt/.md/.rst/.jsonl/.json/.parquet) or a
glob pattern (``shards/*.jsonl``, ``**`` recursive), local or on any fsspec filesystem (``remote.py``:
``s3://bucket/crawl/*.jsonl.zst``, ``https://...``). Files are read here, record by record,
so that a record which cannot be a document is named by file and line: ``text`` files are one
document per file, JSONL one document per line (an object holding ``text_field``), Parquet one
per row (the ``text_field`` column).

Bad records (``SourceConfig.on_bad_record``): an empty file; a JSONL line that is not valid JSON
(a truncated line included) or not an object; a record missing ``text_field``, or whose text is
null, not a string, or empty; text whose invalid UTF-8 exceeds
``stages.clean.max_invalid_utf8_fraction`` of its characters (below that the bad bytes become
U+FFFD, which the clean stage counts as ``utf8_repaired``). Policy ``error`` raises a
DataConfigError naming the file, the line (Parquet: the row) and the fix; ``drop`` skips the
record, logs it with file and line (the first 20 per source) and counts it by kind. A Parquet
file that cannot be opened or lacks the text column is an error under either policy. Blank
JSONL lines are not records and are skipped silently.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from pretrain.data import compressed, hf_disk, remote
from pretrain.data.config import SourceConfig
from pretrain.data.corpus import get_builtin
from pretrain.data.records import (BAD_RECORD_POLICIES, BadRecords, DataConfigError, checked_text, decode, json_type,
                                   source_key)

__all__ = ["BAD_RECORD_POLICIES", "BadRecords", "DataConfigError", "fingerprint", "read_source", "source_files"]

Doc = Tuple[str, str]

_EXT_FORMAT = {".txt": "text", ".md": "text", ".rst": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
FORMATS = ("auto", "text", "jsonl", "parquet", "hf", "builtin")
DEFAULT_MAX_INVALID_UTF8 = 0.001  # CleanConfig.max_invalid_utf8_fraction


def is_builtin(src: SourceConfig) -> bool:
    return src.format == "builtin" or str(src.path).startswith("builtin:")


def _builtin_name(src: SourceConfig) -> str:
    return str(src.path).removeprefix("builtin:")


def is_glob(path: str) -> bool:
    return any(c in str(path) for c in "*?[")


def resolve_path(src: SourceConfig, root: str | None) -> Path:
    p = Path(os.path.expanduser(str(src.path)))
    return p if p.is_absolute() or root is None else Path(os.path.expanduser(root)) / p


def file_format(path: Path) -> Optional[str]:
    """The format a file's name gives (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``, ``.txt``, ...), or None."""
    fmt = _EXT_FORMAT.get(compressed.inner_suffix(path))
    return None if fmt == "parquet" and compressed.compression(path) else fmt  # Parquet compresses inside


def _files_under(path: Path, formats) -> List[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and file_format(p) in formats)


def source_files(src: SourceConfig, root: str | None = None, key: Optional[str] = None) -> Tuple[str, List[Path]]:
    """(format, files) of a source; raises DataConfigError for missing or unreadable input.

    ``key`` names the source in messages (``data.sources[2]``; default: by name).
    """
    key = source_key(src, key)
    if is_builtin(src):
        try:
            corpus = get_builtin(_builtin_name(src))
            return "builtin", corpus.files()
        except (ValueError, FileNotFoundError) as e:
            raise DataConfigError(f"{key}.path={str(src.path)!r}: {e}") from None
    if src.format not in FORMATS:
        raise DataConfigError(f"{key}.format={src.format!r}: choose one of {'|'.join(FORMATS)}")
    formats = set(_EXT_FORMAT.values()) if src.format == "auto" else {src.format}
    exts = [e for e, f in _EXT_FORMAT.items() if f in formats]
    if remote.is_url(src.path):
        if src.format == "hf":
            raise DataConfigError(f"{key}.format=hf: a datasets save_to_disk folder must be local; copy it here, "
                                  f"or point {key}.path at its Arrow/Parquet/JSONL files")
        path = str(src.path)
        files = [f for f in remote.list_files(path, is_glob(path), key) if file_format(f) in formats]
        if not files:
            raise DataConfigError(f"{key}.path: no {'text/JSONL/Parquet' if src.format == 'auto' else src.format} files "
                                  f"({', '.join(exts)}, JSONL and text also .gz/.zst) at {path}; fix the URL or set {key}.format")
        return _checked_format(src, files, key)
    path = resolve_path(src, root)
    relative = not (root or Path(os.path.expanduser(str(src.path))).is_absolute())
    hint = " (a relative path: set data.root to its folder)" if relative else ""
    if is_glob(str(src.path)):
        files = []
        for m in sorted(Path(p) for p in glob.glob(str(path), recursive=True)):
            files += _files_under(m, formats) if m.is_dir() else [m] if m.is_file() else []
        if not files:
            raise DataConfigError(f"{key}.path: the pattern {path} matches no files{hint}; fix the pattern or remove the source")
    else:
        if not path.exists():
            raise DataConfigError(f"{key}.path: {path} does not exist{hint}; fix the path or remove the source")
        if src.format in ("auto", "hf") and hf_disk.is_saved_dataset(path):
            directory = hf_disk.dataset_dir(path, src.hf_split, key)
            hf_disk.check_text_field(directory, src.text_field, key)
            return "hf", hf_disk.files(directory)
        if src.format == "hf":
            raise DataConfigError(f"{key}.path: {path} is not a folder written by datasets' save_to_disk (no state.json "
                                  f"or dataset_dict.json); point it at one or set {key}.format")
        files = _files_under(path, formats) if path.is_dir() else [path]
        if not files:
            raise DataConfigError(
                f"{key}.path: no {'text/JSONL/Parquet' if src.format == 'auto' else src.format} files "
                f"({', '.join(exts)}, JSONL and text also .gz/.zst) under {path}; point it at the data or set {key}.format"
            )
    return _checked_format(src, files, key)


def _checked_format(src: SourceConfig, files: list, key: str) -> Tuple[str, list]:
    formats = {src.format if src.format != "auto" else file_format(f) for f in files}
    if None in formats or len(formats) > 1:
        raise DataConfigError(
            f"{key}: cannot infer one format from {sorted({''.join(f.suffixes[-2:]) for f in files})}; "
            f"set {key}.format to one of text|jsonl|parquet"
        )
    fmt = formats.pop()
    if fmt in ("jsonl", "parquet"):
        _check_text_field(src, fmt, files, key)
    return fmt, files


def _check_text_field(src: SourceConfig, fmt: str, files: List[Path], key: str) -> None:
    """Peek at the first records so a wrong text_field fails before any work starts."""
    first = next((f for f in files if f.stat().st_size > 0), None)
    if first is None:
        return  # empty files: validation and the reader name them
    if fmt == "jsonl":
        keys = None
        with contextlib.closing(compressed.read_lines(first)) as f, contextlib.suppress(compressed.Truncated):
            for n, raw in enumerate(f):  # a cut compressed file: the reader names it
                if n >= 100:
                    break
                try:
                    obj = json.loads(raw.decode("utf-8", errors="replace").lstrip("\ufeff"))
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    keys = list(obj)
                    if src.text_field in keys:
                        return
                    break
        if keys is None:
            return  # no readable record near the top: the reader names the bad lines
    else:
        keys = _parquet_file(first, key).schema_arrow.names
    if src.text_field not in keys:
        raise DataConfigError(
            f"{key}.text_field={src.text_field!r} is not a field of {first} "
            f"(fields: {keys}); set text_field to the one holding the text"
        )


def _parquet_file(path: Path, key: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path.open("rb") if isinstance(path, remote.RemoteFile) else path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DataConfigError(
            f"{key}.path: {path} cannot be read as Parquet ({str(e).splitlines()[0]}); "
            f"re-copy the file or remove it from the source"
        ) from None


def fingerprint(src: SourceConfig, root: str | None = None) -> list:
    """What identifies a source's input for the cache: each file's path (or URL), size, and mtime
    (a remote file: a hash of its metadata)."""
    _, files = source_files(src, root)
    return [(str(f), file_size(f), f.version if isinstance(f, remote.RemoteFile) else f.stat().st_mtime_ns) for f in files]


def file_size(f) -> int:
    """A listed file's size in bytes (a remote file's from its listing)."""
    return f.size if isinstance(f, remote.RemoteFile) else f.stat().st_size


def _read_text(path: Path, bad: BadRecords, tolerance: float) -> Iterator[str]:
    try:
        raw = b"".join(compressed.read_lines(path))
    except compressed.Truncated as e:
        bad.add(path, 0, "truncated_file", f"{e} (a copy cut short?); the document is not read")
        return
    if not raw.strip():
        bad.add(path, 0, "empty_file", "the file is empty (a text file is one document)")
        return
    text, why = decode(raw, tolerance)
    if why:
        bad.add(path, raw.count(b"\n", 0, why[0]) + 1, "invalid_utf8", why[1])
        return
    yield text


def _read_jsonl(path: Path, field: str, bad: BadRecords, tolerance: float, part=None) -> Iterator[str]:
    """``part`` (file_parts.JsonlPart): only its lines, numbered from its start."""
    seen, lines = False, _Lines(path, bad)
    first = part is None or part.start == 0  # its line 1 is the file's
    with contextlib.closing(compressed.read_lines(path) if part is None else iter(part)) as f:
        for lineno, raw in lines.numbered(f):
            if not raw.strip():
                continue
            seen = True
            line, why = decode(raw, tolerance)
            if why:
                bad.add(path, lineno, "invalid_utf8", why[1])
                continue
            try:
                obj = json.loads(line.lstrip("\ufeff") if lineno == 1 and first else line)
            except json.JSONDecodeError as e:
                if not raw.endswith(b"\n"):
                    bad.add(path, lineno, "truncated_line", f"not valid JSON: {e.msg} (column {e.colno}); the file ends inside this record (a truncated copy?)")
                else:
                    bad.add(path, lineno, "invalid_json", f"not valid JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(obj, dict):
                bad.add(path, lineno, "not_an_object", f"a JSON {json_type(obj)}, not an object holding {field!r}")
                continue
            if field not in obj:
                bad.add(path, lineno, "missing_field", f"no field {field!r} (fields: {sorted(obj)[:10]})")
                continue
            text, why = checked_text(obj[field], field)
            if why:
                bad.add(path, lineno, *why)
                continue
            yield text
    if not seen and not lines.truncated and first and (part is None or part.blank_after()):
        bad.add(path, 0, "empty_file", "the file is empty (no JSON lines)")


class _Lines:
    """Numbers a file's lines; a compressed file cut short ends them with a ``truncated_file`` bad record."""

    def __init__(self, path: Path, bad: BadRecords):
        self.path, self.bad, self.truncated = path, bad, False

    def numbered(self, lines):
        lineno = 0
        try:
            for lineno, raw in enumerate(lines, 1):
                yield lineno, raw
        except compressed.Truncated as e:
            self.truncated = True
            self.bad.add(self.path, lineno + 1, "truncated_file", f"{e} (a copy cut short?); the lines before it are read")


def _read_parquet(path: Path, field: str, bad: BadRecords, tolerance: float, groups=None) -> Iterator[str]:
    """``groups``: only row groups [first, end), rows numbered as in the file."""
    import pyarrow as pa

    if path.stat().st_size == 0:
        bad.add(path, 0, "empty_file", "the file is empty (0 bytes)")
        return
    pf = _parquet_file(path, bad.key)
    if field not in pf.schema_arrow.names:
        raise DataConfigError(
            f"{bad.key}.text_field={field!r} is not a column of {path} (columns: {pf.schema_arrow.names}); "
            f"set text_field to the one holding the text, or remove that file"
        )
    if pf.metadata.num_rows == 0:
        bad.add(path, 0, "empty_file", "the file has no rows")
        return
    groups = range(*groups) if groups else range(pf.metadata.num_row_groups)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(groups.start))
    try:
        batches = pf.iter_batches(columns=[field], batch_size=1024, row_groups=list(groups))
        for batch in batches:
            col = batch.column(0)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                col = col.cast(pa.large_binary())  # decode here: invalid UTF-8 is then one bad row
            for v in col.to_pylist():
                row += 1
                if isinstance(v, bytes):
                    v, why = decode(v, tolerance)
                    if why:
                        bad.add(path, row, "invalid_utf8", why[1], unit="row")
                        continue
                text, why = checked_text(v, field)
                if why:
                    bad.add(path, row, *why, unit="row")
                    continue
                yield text
    except (OSError, pa.ArrowException) as e:
        raise DataConfigError(
            f"{bad.key}.path: {path} is damaged after row {row} ({str(e).splitlines()[0]}); "
            f"re-copy the file or remove it from the source"
        ) from None


def read_source(
    src: SourceConfig,
    root: str | None = None,
    *,
    key: Optional[str] = None,
    bad: Optional[BadRecords] = None,
    max_invalid_utf8_fraction: float = DEFAULT_MAX_INVALID_UTF8,
) -> Iterator[Doc]:
    """Yield (doc_id, text) in a deterministic order; bad records are refused or counted in ``bad``.

    Invalid UTF-8 up to ``max_invalid_utf8_fraction`` of a record's characters becomes U+FFFD.
    """
    fmt, files = source_files(src, root, key)
    if fmt == "builtin":
        docs = get_builtin(_builtin_name(src)).read()
    else:
        bad = bad or BadRecords(src, key)
        docs = ((f"{i}", t) for i, t in enumerate(read_files(src, fmt, files, bad, max_invalid_utf8_fraction)))
    for i, doc in enumerate(docs):
        if src.max_docs is not None and i >= src.max_docs:
            break
        yield doc


def read_part(src: SourceConfig, fmt: str, f, key: str, tolerance: float, start: int, end: int):
    """(bad, texts, part) for part [start, end) of file ``f`` (file_parts.parts): a JSONL byte range
    (``part`` then counts its lines) or Parquet row groups (``part`` None)."""
    from pretrain.data.file_parts import JsonlPart

    if fmt == "jsonl":
        part = JsonlPart(f, start, end)
        bad = BadRecords(src, key, part=part)
        return bad, _read_jsonl(f, src.text_field, bad, tolerance, part=part), part
    bad = BadRecords(src, key)
    return bad, _read_parquet(f, src.text_field, bad, tolerance, groups=(start, end)), None


def read_files(src: SourceConfig, fmt: str, files: List[Path], bad: BadRecords, tolerance: float) -> Iterator[str]:
    """The texts of ``files`` (all of one source, of format ``fmt``), in order; bad records go to ``bad``."""
    for f in files:
        if fmt == "hf":  # files: the dataset folder's state.json, then its Arrow files
            yield from hf_disk.read(f.parent, src.text_field, bad)
            return
        if fmt == "text":
            yield from _read_text(f, bad, tolerance)
        elif fmt == "jsonl":
            yield from _read_jsonl(f, src.text_field, bad, tolerance)
        else:
            yield from _read_parquet(f, src.text_field, bad, tolerance)
