"""A large input file's parts (file_parts.py): every line read exactly once, whatever the cuts; the
lines before a part counted as the file numbers them; Parquet cut at row groups."""

from __future__ import annotations

import gzip
import random

import pytest

from pretrain.data.file_parts import JsonlPart, even_ranges, parts


def _file(tmp_path, trailing_newline: bool):
    rng = random.Random(int(trailing_newline))
    lines = [b"", b"{}", b"  "] + [("x" * rng.randint(0, 40)).encode() for _ in range(40)] + [b"\xc3\xa9 two-byte"]
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    path = tmp_path / f"f{int(trailing_newline)}.jsonl"
    path.write_bytes(data)
    return path, data.splitlines(keepends=True)


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_parts_read_every_line_once_at_every_cut(tmp_path, trailing_newline):
    path, want = _file(tmp_path, trailing_newline)
    size = path.stat().st_size
    cuts = [[c] for c in range(1, size)] + [sorted(random.Random(k).sample(range(1, size), 5)) for k in range(50)]
    for cut in cuts:
        bounds = [0, *cut, size]
        got, before = [], 0
        for a, b in zip(bounds, bounds[1:]):
            part = JsonlPart(path, a, b)
            lines = list(part)
            assert part.lines == len(lines)
            if lines:
                assert part.lines_before() == before == len(got), (cut, a)
            got += lines
            before += part.lines
        assert got == want, cut


def test_blank_after_sees_text_past_a_part(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\n  \n\t\n" * 100 + b"{}\n")
    first = JsonlPart(path, 0, 100)
    assert all(not line.strip() for line in first) and not first.blank_after()
    path.write_bytes(b"\n  \n\t\n" * 100)
    first = JsonlPart(path, 0, 100)
    list(first)
    assert first.blank_after()


def test_what_is_cut_and_how(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert even_ranges(10, 3) == [(0, 2), (2, 5), (5, 7), (7, 10)] and even_ranges(5, 100) == [(0, 5)]
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b"{}\n" * 1000)
    assert parts(plain, "jsonl", 3000, 1000) == [(0, 1000), (1000, 2000), (2000, 3000)]
    assert parts(plain, "jsonl", 3000, 5000) == []  # one part
    packed = tmp_path / "a.jsonl.gz"
    packed.write_bytes(gzip.compress(b"{}\n" * 1000))
    assert parts(packed, "jsonl", 3000, 1000) == []  # a compressed file is read whole
    assert parts(plain, "text", 3000, 1000) == []  # a text file is one document
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * 20 for i in range(100)]}), table, row_group_size=10)
    groups = parts(table, "parquet", table.stat().st_size, 3000)
    assert groups[0][0] == 0 and groups[-1][1] == 10 and len(groups) > 1
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(groups, groups[1:]))
