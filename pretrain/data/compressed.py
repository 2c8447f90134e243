"""Reading source files that may be compressed: ``.jsonl.gz`` (gzip) and ``.jsonl.zst`` (Zstandard).

A source file's format comes from its name: the last suffix, or the one before a compression suffix
(``part-0001.jsonl.zst`` is JSONL). Compressed files are decompressed as a stream, line by line; a
file that ends inside its compressed data (a copy cut short) raises ``Truncated`` where it ends,
which the reader turns into a bad record of the source's ``on_bad_record`` policy.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}


class Truncated(Exception):
    """A compressed file ends inside its data."""


def compression(path: Path) -> Optional[str]:
    return COMPRESSIONS.get(path.suffix)


def inner_suffix(path: Path) -> str:
    """The suffix that names the format: ``.jsonl`` for ``a.jsonl.gz`` and for ``a.jsonl``."""
    if compression(path) is None:
        return path.suffix
    return Path(path.stem).suffix


def read_lines(path: Path):
    """The lines of ``path`` as bytes, decompressed if its name says so. A compressed file that ends
    inside its data raises ``Truncated`` after its last complete line."""
    kind = compression(path)
    if kind == "zstd":
        yield from _zstd_lines(path)
        return
    with path.open("rb") as raw, (gzip.GzipFile(fileobj=raw) if kind == "gzip" else raw) as f:
        try:
            yield from f
        except EOFError as e:  # gzip: "Compressed file ended before the end-of-stream marker was reached"
            raise Truncated(str(e)) from None
        except gzip.BadGzipFile as e:
            raise Truncated(str(e)) from None


def _zstd_lines(path: Path, chunk_bytes: int = 1 << 20):
    """Zstandard frames one after another (as concatenated or multi-threaded writers produce them);
    zstandard's stream reader ends silently on a cut file, so the frame ends are checked here."""
    import zstandard

    def frame():
        return zstandard.ZstdDecompressor().decompressobj()

    pending, d, fed = b"", frame(), False
    with path.open("rb") as raw:
        while chunk := raw.read(chunk_bytes):
            while chunk:
                try:
                    pending += d.decompress(chunk)
                except zstandard.ZstdError as e:
                    raise Truncated(f"damaged Zstandard data: {e}") from None
                fed = True
                chunk = b""
                if d.eof:  # a frame ended; what follows starts the next one
                    chunk, d, fed = d.unused_data, frame(), False
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line + b"\n"
    if fed:
        raise Truncated("the file ends inside a Zstandard frame")
    if pending:
        yield pending
