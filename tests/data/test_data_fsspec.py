"""Sources on fsspec filesystems: an HTTP server (Python's http.server on loopback, with folder
listings), ``file://`` URLs and a chained ``zip://`` URL read exactly like the same local files, in
every format; a changed remote file changes the cache key; unknown protocols, missing URLs and
remote save_to_disk folders are named errors."""

from __future__ import annotations

import gzip
import json
import random
import time
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_synth import make_doc
from harness import http_server
from pretrain.data import DataConfigError
from pretrain.data.config import SourceConfig
from pretrain.data.sources import BadRecords, fingerprint, read_source, source_files

_rng = random.Random(13)
DOCS = [make_doc(11000 + i, _rng) for i in range(30)]
RAW = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in DOCS)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    (root / "jsonl" / "deeper").mkdir(parents=True)
    (root / "jsonl" / "part-0.jsonl").write_bytes(RAW)
    (root / "jsonl" / "part-1.jsonl.gz").write_bytes(gzip.compress(RAW))
    (root / "jsonl" / "deeper" / "part-2.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(RAW))
    (root / "jsonl" / "notes.csv").write_text("not a source file\n")
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), root / "parquet" / "rows.parquet", row_group_size=7)
    (root / "text").mkdir()
    (root / "text" / "book.txt").write_text(DOCS[0])
    with zipfile.ZipFile(root / "dump.zip", "w") as z:
        z.writestr("a.jsonl", RAW)
        z.writestr("b.jsonl", RAW)
    with http_server(root) as url:
        yield root, url


def _read(path, fmt="auto", policy="error"):
    src = SourceConfig(name="s", path=str(path), format=fmt, on_bad_record=policy)
    bad = BadRecords(src, "data.sources[0]")
    return [t for _, t in read_source(src, key="data.sources[0]", bad=bad)]


@pytest.mark.parametrize("where", ["http", "file"])
@pytest.mark.parametrize("rel, want", [
    ("jsonl", DOCS * 3),  # a folder: found recursively, plain/.gz/.zst, the .csv ignored
    ("jsonl/part-*.jsonl*", DOCS * 2),
    ("parquet/rows.parquet", DOCS),
    ("text/book.txt", [DOCS[0]]),
])
def test_a_url_reads_like_the_local_path(served, where, rel, want):
    root, url = served
    base = url if where == "http" else f"file://{root}"
    remote_fmt, remote_files = source_files(SourceConfig(name="s", path=f"{base}/{rel}"))
    local_fmt, local_files = source_files(SourceConfig(name="s", path=str(root / rel)))
    assert remote_fmt == local_fmt
    assert [f.name for f in remote_files] == [f.name for f in local_files]
    assert all(str(f).startswith(base) for f in remote_files)
    assert _read(f"{base}/{rel}") == _read(root / rel) == want


def test_a_chained_zip_url_reads_the_archive(served):
    root, url = served
    assert _read(f"zip://*.jsonl::file://{root}/dump.zip") == DOCS * 2
    # An archive needs random access: over a server without range requests, a named error.
    with pytest.raises(DataConfigError, match="range requests.*fix the URL"):
        source_files(SourceConfig(name="s", path=f"zip://*.jsonl::{url}/dump.zip"))


@pytest.mark.parametrize("rel", ["jsonl/part-0.jsonl", "jsonl/part-0.*", "jsonl"])  # a file, a glob, a folder
def test_a_changed_remote_file_changes_the_fingerprint(served, rel):
    root, url = served
    src = SourceConfig(name="s", path=f"{url}/{rel}")
    before = fingerprint(src)
    assert fingerprint(src) == before  # stable while the file is
    time.sleep(1.1)  # Last-Modified has a resolution of one second
    (root / "jsonl" / "part-0.jsonl").write_bytes(RAW.replace(b"the", b"THE", 1))  # same size: Last-Modified tells
    try:
        assert fingerprint(src) != before
    finally:
        (root / "jsonl" / "part-0.jsonl").write_bytes(RAW)


def test_a_bad_remote_record_is_named_by_url_and_line(served, tmp_path):
    root, url = served
    (root / "bad").mkdir(exist_ok=True)
    (root / "bad" / "b.jsonl").write_bytes(RAW[:2000] + b"\n{not json\n")
    with pytest.raises(DataConfigError, match=rf"{url}/bad/b.jsonl.*line"):
        _read(f"{url}/bad/b.jsonl")


@pytest.mark.parametrize("path, message", [
    ("nosuchfs://bucket/x.jsonl", "nosuchfs"),
    ("{url}/missing/part.jsonl", "does not exist"),
    ("{url}/jsonl/*.parquet", "no text/JSONL/Parquet files"),
    ("{url}/jsonl/notes.csv", "no text/JSONL/Parquet files"),
])
def test_bad_urls_are_named(served, path, message):
    _, url = served
    with pytest.raises(DataConfigError, match=message) as e:
        source_files(SourceConfig(name="s", path=path.format(url=url)), key="data.sources[0]")
    assert "data.sources[0].path" in str(e.value)


def test_a_remote_saved_dataset_is_refused_by_name(served):
    _, url = served
    with pytest.raises(DataConfigError, match="must be local"):
        source_files(SourceConfig(name="s", path=f"{url}/hf", format="hf"))
