"""Parts of one large input file, so that read + clean spreads a source of a few big files over
tasks: a plain JSONL file by byte range (a part holds the lines that start inside it, as chunks
of part files do), a Parquet file by row groups. Compressed JSONL and text files (one document
each) are read whole.

A part cannot know how many lines come before it without reading them, so a JSONL part numbers
its lines from its start; ``JsonlPart.lines_before`` counts them (reading the file up to there)
only when a bad record must be named under ``on_bad_record: error``, and the span pass places the
dropped records' lines from the earlier parts' counts (clean_tasks.merged_bad_records).
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Iterator, List, Tuple

from pretrain.data import compressed

_BLOCK = 1 << 24


def lines_in_range(f: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    """The lines of open file ``f`` that start in byte range [start, end)."""
    pos = 0
    if start > 0:  # skip the line that started before this range (or the newline ending it)
        f.seek(start - 1)
        pos = start - 1 + len(f.readline())
    while pos < end:
        line = f.readline()
        if not line:
            return
        pos += len(line)
        yield line


def even_ranges(size: int, target: int) -> List[Tuple[int, int]]:
    """[0, size) cut into ceil(size / target) ranges of about equal length."""
    n = max(1, -(-size // max(target, 1)))
    bounds = [size * i // n for i in range(n + 1)]
    return list(zip(bounds, bounds[1:]))


def parts(f, fmt: str, size: int, target: int) -> List[Tuple[int, int]]:
    """File ``f``'s parts for tasks of about ``target`` bytes: byte ranges (plain JSONL) or row-group
    ranges (Parquet); none when it is one part or cannot be split."""
    if size <= target:
        return []
    if fmt == "jsonl" and compressed.compression(f) is None:
        return even_ranges(size, target) if _seekable(f, size) else []
    if fmt != "parquet":
        return []
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with f.open("rb") as raw:
            meta = pq.ParquetFile(raw).metadata
    except (OSError, ValueError, pa.ArrowException):
        return []  # read whole: the reader names what is wrong with it
    if meta.num_rows == 0:
        return []
    out, first, acc = [], 0, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        if acc >= target or g == meta.num_row_groups - 1:
            out.append((first, g + 1))
            first, acc = g + 1, 0
    return out if len(out) > 1 else []


def _seekable(f, size: int) -> bool:
    """Whether ``f`` can be read from the middle: a local file can; a remote one if its store serves
    byte ranges (an HTTP server may not: then the file is read whole)."""
    if isinstance(f, Path):
        return True
    try:
        with f.open("rb") as raw:
            raw.seek(size // 2)
            return len(raw.read(1)) == 1
    except (OSError, ValueError):
        return False


class JsonlPart:
    """The lines of JSONL file ``path`` that start in [start, end); ``lines`` counts those read."""

    def __init__(self, path, start: int, end: int):
        self.path, self.start, self.end = path, start, end
        self.lines, self._first, self._after = 0, None, None

    def __iter__(self) -> Iterator[bytes]:
        with self.path.open("rb") as f:
            pos = None
            for line in lines_in_range(f, self.start, self.end):
                if pos is None:
                    pos = self._first = f.tell() - len(line)
                pos += len(line)
                self.lines += 1
                yield line
            self._after = pos if pos is not None else max(self.start, f.tell())
            if self._first is None:
                self._first = self._after

    def lines_before(self) -> int:
        """The file's lines before this part's first (read from the file's start)."""
        first = self.start if self._first is None else self._first
        n = 0
        with self.path.open("rb") as f:
            while first > 0 and (block := f.read(min(_BLOCK, first))):
                n += block.count(b"\n")
                first -= len(block)
        return n

    def blank_after(self) -> bool:
        """Whether the file holds only whitespace after this part (after reading it)."""
        with self.path.open("rb") as f:
            f.seek(self._after)
            while block := f.read(_BLOCK):
                if block.strip():
                    return False
        return True
