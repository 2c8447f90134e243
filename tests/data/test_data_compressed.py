"""Compressed JSONL and text sources (.gz, .zst): read like plain files, format from the name, and a
file cut short is a bad record (``truncated_file``) under the source's ``on_bad_record`` policy."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import zstandard

from data_synth import make_doc
from pretrain.data import DataConfigError
from pretrain.data.config import SourceConfig
from pretrain.data.sources import BadRecords, read_source, source_files

_rng = random.Random(5)
DOCS = [make_doc(7000 + i, _rng) for i in range(40)]
RAW = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in DOCS)


def _zstd_frames(data: bytes, frames: int) -> bytes:
    """Concatenated frames, as parallel compressors write them."""
    step = len(data) // frames + 1
    return b"".join(zstandard.ZstdCompressor().compress(data[i : i + step]) for i in range(0, len(data), step))


WRITERS = {
    "plain.jsonl": lambda b: b,
    "part.jsonl.gz": gzip.compress,
    "part.jsonl.zst": lambda b: zstandard.ZstdCompressor().compress(b),
    "frames.jsonl.zst": lambda b: _zstd_frames(b, 3),
}


def _read(path, policy="error", fmt="auto"):
    src = SourceConfig(name="s", path=str(path), format=fmt, on_bad_record=policy)
    bad = BadRecords(src, "data.sources[0]")
    return [t for _, t in read_source(src, key="data.sources[0]", bad=bad)], bad


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_compressed_jsonl_reads_like_plain(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(WRITERS[name](RAW))
    assert source_files(SourceConfig(name="s", path=str(path)))[0] == "jsonl"
    docs, bad = _read(path)
    assert docs == DOCS and bad.total == 0


def test_a_folder_of_mixed_compression_is_one_jsonl_source(tmp_path):
    for name, write in WRITERS.items():
        (tmp_path / name).write_bytes(write(RAW))
    fmt, files = source_files(SourceConfig(name="s", path=str(tmp_path)))
    assert fmt == "jsonl" and len(files) == len(WRITERS)
    docs, _ = _read(tmp_path)
    assert docs == DOCS * len(WRITERS)


def test_compressed_text_is_one_document(tmp_path):
    (tmp_path / "book.txt.gz").write_bytes(gzip.compress(DOCS[0].encode()))
    assert _read(tmp_path / "book.txt.gz")[0] == [DOCS[0]]


@pytest.mark.parametrize("name", ["part.jsonl.gz", "part.jsonl.zst", "frames.jsonl.zst"])
def test_a_cut_compressed_file_is_a_bad_record(tmp_path, name):
    full = WRITERS[name](RAW)
    path = tmp_path / name
    path.write_bytes(full[: int(len(full) * 0.7)])
    with pytest.raises(DataConfigError) as e:
        _read(path, "error")
    assert str(path) in str(e.value) and "cut short" in str(e.value)
    docs, bad = _read(path, "drop")
    assert bad.counts == {"truncated_file": 1}
    assert docs == DOCS[: len(docs)] and len(docs) < len(DOCS)  # the complete lines before the cut


def test_compressed_parquet_is_not_a_format(tmp_path):
    (tmp_path / "t.parquet.gz").write_bytes(gzip.compress(b"x"))
    with pytest.raises(DataConfigError, match="no text/JSONL/Parquet files"):
        source_files(SourceConfig(name="s", path=str(tmp_path)))
