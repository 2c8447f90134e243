"""Bad input records (empty files, truncated or invalid JSON lines, invalid UTF-8, missing or
non-string text, a JSON line that is not an object, bad Parquet rows) under both policies of
``on_bad_record``: ``error`` names the file and line, ``drop`` counts, logs and drops them, and
the counts reach the stage table and the mixture report."""

from __future__ import annotations

import io
import json
import logging
import random

import pytest
from rich.console import Console

from data_synth import make_doc
from pretrain.data import DataConfigError, prepare_data
from pretrain.data.config import SourceConfig
from pretrain.data.sources import BadRecords, read_source

QUIET = Console(quiet=True)
GOOD = 4  # good documents around each bad record
_rng = random.Random(11)
DOCS = [make_doc(5000 + i, _rng) for i in range(64)]


def _line(i):
    return json.dumps({"text": DOCS[i]}).encode() + b"\n"


def _jsonl(path, bad: bytes, at: int = 2, newline: bool = True):
    """GOOD good lines with ``bad`` as line ``at`` (1-based); returns (file, line of the bad record)."""
    lines = [_line(i) for i in range(GOOD)]
    lines.insert(at - 1, bad + (b"\n" if newline else b""))
    path.write_bytes(b"".join(lines))
    return path, at


def _truncated(tmp):
    p = tmp / "t.jsonl"
    good = b"".join(_line(i) for i in range(GOOD))
    p.write_bytes(good + _line(GOOD)[:40])  # the copy stopped inside the last record
    return p, GOOD + 1


def _text_dir(tmp):
    d = tmp / "txt"
    d.mkdir()
    for i in range(GOOD):
        (d / f"{i}.txt").write_text(DOCS[i])
    (d / "9bad.txt").write_bytes(b"Title line.\n" + DOCS[10].encode()[:100] + b"\xff\xfe\xfa" * 20 + DOCS[10].encode()[100:])
    return d, d / "9bad.txt", 2


def _parquet(tmp, values, binary=False):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp / "p.parquet"
    col = pa.array(values, type=pa.binary() if binary else pa.string())
    pq.write_table(pa.table({"text": col}), p)
    return p


# kind -> (build(tmp) -> (source path, bad file, line or 0), format, expected kind, message fragment)
CASES = {
    "truncated_jsonl": (lambda t: (*_truncated(t),), "jsonl", "truncated_line", "file ends inside this record"),
    "invalid_json": (lambda t: _jsonl(t / "j.jsonl", b'{"text": "a", }'), "jsonl", "invalid_json", "not valid JSON"),
    "invalid_utf8_jsonl": (
        lambda t: _jsonl(t / "u.jsonl", b'{"text": "' + DOCS[20][:50].encode() + b"\xff\xc3(" * 30 + b'"}', at=3),
        "jsonl", "invalid_utf8", "invalid UTF-8",
    ),
    "missing_field": (lambda t: _jsonl(t / "m.jsonl", json.dumps({"body": DOCS[21]}).encode(), at=4), "jsonl", "missing_field", "no field 'text'"),
    "not_an_object": (lambda t: _jsonl(t / "o.jsonl", json.dumps([DOCS[22]]).encode(), at=2), "jsonl", "not_an_object", "a JSON array, not an object"),
    "null_text": (lambda t: _jsonl(t / "n.jsonl", b'{"text": null}', at=3), "jsonl", "null_text", "'text' is null"),
    "number_text": (lambda t: _jsonl(t / "x.jsonl", b'{"text": 42}', at=3), "jsonl", "text_not_string", "is a number, not a string"),
    "empty_text": (lambda t: _jsonl(t / "e.jsonl", b'{"text": "   "}', at=5), "jsonl", "empty_text", "'text' is empty"),
    "surrogate": (lambda t: _jsonl(t / "s.jsonl", b'{"text": "abc \\ud800 def"}', at=2), "jsonl", "invalid_utf8", "unpaired surrogate"),
    "invalid_utf8_text": (lambda t: _text_dir(t), "text", "invalid_utf8", "invalid UTF-8"),
    "parquet_invalid_utf8": (
        lambda t: (_parquet(t, [d.encode() for d in DOCS[:2]] + [b"\xff\xfe" * 50] + [d.encode() for d in DOCS[2:4]], binary=True), None, 3),
        "parquet", "invalid_utf8", "invalid UTF-8",
    ),
    "parquet_null": (lambda t: (_parquet(t, DOCS[:1] + [None] + DOCS[1:4]), None, 2), "parquet", "null_text", "'text' is null"),
}


def _build(name, tmp):
    build, fmt, kind, fragment = CASES[name]
    out = build(tmp)
    src_path, bad_file, line = (out[0], out[0], out[1]) if len(out) == 2 else out
    return src_path, bad_file or src_path, line, fmt, kind, fragment


def _src(path, fmt, policy, name="s"):
    return SourceConfig(name=name, path=str(path), format=fmt, on_bad_record=policy)


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_policy_names_file_and_line(case, tmp_path):
    path, bad_file, line, fmt, _, fragment = _build(case, tmp_path)
    unit = "row" if fmt == "parquet" else "line"
    with pytest.raises(DataConfigError) as e:
        list(read_source(_src(path, fmt, "error"), key="data.sources[3]"))
    msg = str(e.value)
    assert f"{bad_file} {unit} {line}: " in msg and fragment in msg, msg
    assert "data.sources[3].on_bad_record=drop" in msg  # the fix


@pytest.mark.parametrize("case", sorted(CASES))
def test_drop_policy_counts_logs_and_drops(case, tmp_path, caplog):
    path, bad_file, line, fmt, kind, _ = _build(case, tmp_path)
    src = _src(path, fmt, "drop")
    bad = BadRecords(src, "data.sources[3]")
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        docs = [t for _, t in read_source(src, bad=bad)]
    assert len(docs) == GOOD and all(d in DOCS for d in docs)
    assert bad.counts == {kind: 1}
    unit = "row" if fmt == "parquet" else "line"
    assert any(f"{bad_file} {unit} {line}" in r.getMessage() and "data.sources[3]" in r.getMessage() for r in caplog.records)


def test_stray_invalid_byte_below_the_tolerance_is_repaired_not_bad(tmp_path):
    """One bad byte in a long record stays a document (U+FFFD; the clean stage counts it)."""
    path, _ = _jsonl(tmp_path / "r.jsonl", b'{"text": "' + DOCS[30].encode() * 3 + b'\xff"}', at=2)
    docs = [t for _, t in read_source(_src(path, "jsonl", "error"))]
    assert len(docs) == GOOD + 1 and docs[1].endswith("\ufffd")


def test_blank_lines_are_not_records(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(_line(0) + b"\n   \n" + _line(1) + b"\n")
    assert len(list(read_source(_src(p, "jsonl", "error")))) == 2


# ---- empty files ------------------------------------------------------------------------------------


def _cfg(tmp_path, sources, **over):
    cfg = {
        "name": "bad", "cache_dir": str(tmp_path / "cache"), "progress": False, "num_workers": 1, "split": "1,0,0",
        "sources": [{"curated": True, **s} for s in sources],
        "tokenizer": {"vocab_size": 300},
        "stages": {"quality": {"enabled": False}, "dedup": {"enabled": False}},
    }
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("policy", ["error", "drop"])
@pytest.mark.parametrize("ext", ["jsonl", "txt", "parquet"])
def test_a_source_with_no_documents_is_a_named_error(tmp_path, policy, ext):
    empty = tmp_path / f"empty.{ext}"
    empty.write_bytes(b"")
    cfg = _cfg(tmp_path, [{"name": "ok", "path": str(_jsonl(tmp_path / "ok.jsonl", _line(9))[0])},
                          {"name": "void", "path": str(empty), "on_bad_record": policy}])
    with pytest.raises(DataConfigError, match=rf"data\.sources\[1\]\.path: .*empty\.{ext} empty \(0 bytes\): source 'void' has no documents"):
        prepare_data(cfg, console=QUIET)
    assert not (tmp_path / "cache" / "clean").exists()  # refused before any work


def test_a_source_whose_records_are_all_bad_is_a_named_error(tmp_path):
    p = tmp_path / "junk.jsonl"
    p.write_bytes(b"not json\n[1, 2]\n")
    cfg = _cfg(tmp_path, [{"name": "junk", "path": str(p), "on_bad_record": "drop"}])
    with pytest.raises(DataConfigError, match=r"data\.sources\[0\] \(source 'junk'\): no documents .*2 bad records dropped: invalid_json 1, not_an_object 1"):
        prepare_data(cfg, console=QUIET)


def test_empty_file_among_others(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    _jsonl(d / "a.jsonl", _line(9))
    (d / "b.jsonl").write_bytes(b"")
    src = {"name": "parts", "path": str(d)}
    with pytest.raises(DataConfigError, match=r"data\.sources\[0\]\.path: .*b\.jsonl is empty \(0 bytes\).*on_bad_record=drop"):
        prepare_data(_cfg(tmp_path, [src]), console=QUIET)
    bad = BadRecords(_src(d, "jsonl", "drop"))
    assert len(list(read_source(_src(d, "jsonl", "drop"), bad=bad))) == GOOD + 1 and bad.counts == {"empty_file": 1}


# ---- through prepare_data: the stage table, the report, the cache key ---------------------------------


PIPELINE_CASES = ["truncated_jsonl", "invalid_utf8_jsonl", "missing_field", "not_an_object", "invalid_utf8_text", "parquet_invalid_utf8"]


@pytest.fixture(scope="module")
def dropped_run(tmp_path_factory):
    """One prepare_data run over sources each holding one bad record, all with on_bad_record: drop."""
    tmp = tmp_path_factory.mktemp("bad")
    sources = []
    for case in PIPELINE_CASES:
        d = tmp / case
        d.mkdir()
        path, bad_file, line, fmt, kind, _ = _build(case, d)
        sources.append({"name": case, "path": str(path), "format": fmt, "on_bad_record": "drop", "_expect": (bad_file, line, kind)})
    expect = {s["name"]: s.pop("_expect") for s in sources}
    cfg = _cfg(tmp, sources)
    out = io.StringIO()
    p = prepare_data(cfg, console=Console(file=out, width=250))
    return cfg, p, out.getvalue(), expect


def test_dropped_counts_reach_stage_table_and_report(dropped_run):
    cfg, p, console, expect = dropped_run
    for case, (bad_file, line, kind) in expect.items():
        clean = p.stage_stats["clean"][case]
        assert clean["bad_records"] == 1 and clean["bad_record_kinds"] == {kind: 1}
        assert clean["docs_in"] == GOOD and p.docs[case] == GOOD
        unit = "row" if kind and case.startswith("parquet") else "line"
        assert clean["bad_record_examples"] == [f"{bad_file} {unit} {line}: {kind}"]
        row = next(r for r in p.report["sources"] if r["source"] == case)
        assert row["bad_records"] == 1
    saved = json.load(open(f"{p.shard_dir}/mixture_report.json"))
    assert {r["source"]: r["bad_records"] for r in saved["sources"]} == {c: 1 for c in expect}
    # The read + clean table and the mixture table both show the column, with the kind.
    assert console.count("bad records dropped") == 2
    for case, (_, _, kind) in expect.items():
        assert any(case in ln and f"1 ({kind} 1)" in ln for ln in console.splitlines()), case


def test_policy_is_part_of_the_cache_key(dropped_run, tmp_path):
    """The run above cached its read stage under drop; switching a source to error must read it
    again (and refuse the bad record), not reuse what drop produced."""
    cfg, p, _, expect = dropped_run
    again = prepare_data(cfg, console=QUIET)
    assert again.cache_hit and again.report["sources"] == p.report["sources"]
    strict = json.loads(json.dumps(cfg))
    strict["sources"][0]["on_bad_record"] = "error"
    bad_file, line, _ = expect[strict["sources"][0]["name"]]
    with pytest.raises(DataConfigError, match=rf"data\.sources\[0\] .*{bad_file} line {line}: "):
        prepare_data(strict, console=QUIET)
