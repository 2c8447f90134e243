"""Read + clean of a source of several files runs as a task per run of files, then the span pass per
source (clean_tasks.py); its output must equal the one-task path's, byte for byte: the documents
and their ids, the repeated-span removals across files, the stats and the bad records."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
from rich.console import Console

from data_synth import WORDS
from pretrain.data import prepare_data
from pretrain.data.records import DataConfigError

QUIET = Console(quiet=True)


def _sentence(rng: random.Random, lead: str = "", words: tuple = (6, 10)) -> str:
    return (lead + " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))).capitalize() + "."


def _paragraph(rng: random.Random, n: int = 4, lead: str = "") -> str:
    return " ".join([_sentence(rng, lead)] + [_sentence(rng) for _ in range(n - 1)])


def _docs(n: int, seed: int) -> list:
    """Documents that share paragraphs (spans repeated across files), copies of earlier documents
    (left whole for dedup), short ones left with too few sentences once their repeats go, and lines
    that C4's line rule drops."""
    rng = random.Random(seed)
    pool = [_paragraph(rng) for _ in range(25)]
    docs: list = []
    for i in range(n):
        if i % 7 == 6 and docs:
            docs.append(rng.choice(docs))
        elif i % 13 == 12:  # dropped whatever the span pass does: too few sentences, or too short
            docs.append(_paragraph(rng, 4, f"note {i} ") if i % 2 else " ".join(_sentence(rng, f"n{i} ", (2, 3)) for _ in range(5)))
        elif i % 11 == 10:
            own = " ".join(_sentence(rng, f"item {i} ", (14, 18)) for _ in range(4))  # after its repeat goes: too few sentences
            docs.append(f"{own}\n{rng.choice(pool)}")
        else:
            own = [_paragraph(rng, lead=f"record {i} "), _paragraph(rng)]
            docs.append("\n".join([own[0], "a heading without an end", *rng.sample(pool, rng.randint(1, 2)), own[1]]))
    return docs


def _corpus(root: Path) -> list:
    web = root / "web"
    web.mkdir()
    docs = _docs(400, 1)
    for k in range(8):
        lines = [json.dumps({"text": t}) for t in docs[k * 50 : (k + 1) * 50]]
        if k == 3:
            lines[10:10] = ["{not json", json.dumps({"text": "  "})]
        data = ("\n".join(lines) + "\n").encode()
        if k == 5:
            (web / f"part-{k}.jsonl.gz").write_bytes(gzip.compress(data))
        else:
            (web / f"part-{k}.jsonl").write_bytes(data)
    books = root / "books"
    books.mkdir()
    chapters = _docs(600, 2)
    for k in range(30):  # long documents, one per file
        (books / f"{k:03d}.txt").write_text("\n\n".join(chapters[k * 20 : (k + 1) * 20]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = root / "tables"
    tables.mkdir()
    docs = _docs(240, 3)
    for k in range(3):
        pq.write_table(pa.table({"text": docs[k * 80 : (k + 1) * 80]}), tables / f"t{k}.parquet")
    # One large JSONL file (read in byte-range parts): a BOM, blank lines, and bad records in
    # several parts; one large Parquet file of 30-row groups (read a few groups at a time).
    dump = root / "dump"
    dump.mkdir()
    lines = [json.dumps({"text": t}) for t in _docs(600, 4)]
    for at, bad in ((590, "[1, 2]"), (444, "{broken"), (301, json.dumps({"text": ""})), (160, "{also broken"), (3, "")):
        lines[at:at] = [bad]
    lines[0] = "\ufeff" + lines[0]
    (dump / "all.jsonl").write_text("\n".join(lines), encoding="utf-8")  # no newline after the last
    sheet = root / "sheet"
    sheet.mkdir()
    rows = _docs(330, 5)
    rows[200] = None
    pq.write_table(pa.table({"text": rows}), sheet / "all.parquet", row_group_size=30)
    return [{"name": "web", "path": str(web), "on_bad_record": "drop"}, {"name": "books", "path": str(books)},
            {"name": "tables", "path": str(tables)}, {"name": "dump", "path": str(dump), "on_bad_record": "drop"},
            {"name": "sheet", "path": str(sheet), "on_bad_record": "drop"}]


def _cfg(cache: Path, sources: list, **source_extra) -> dict:
    return {
        "name": "split", "cache_dir": str(cache), "progress": False, "num_workers": 2, "split": "1,0,0",
        "task_bytes": 100_000, "tokenizer": {"vocab_size": 300}, "stages": {"quality": {"enabled": False}},
        "sources": [{"curated": True, **s, **source_extra} for s in sources],
    }


SPILL = {"overrides": {"clean": {"spans_in_memory": 50}}}  # the span record goes to disk past 50 spans


def _with(sources: list, names: set, extra: dict) -> list:
    return [{**s, **extra} if s["name"] in names else s for s in sources]


def _span_runs(cache: Path) -> dict:
    """Each source's span-record runs written to disk, from its clean stats."""
    out = {}
    for stats in (cache / "clean").glob("*/stats.json"):
        s = json.loads(stats.read_text())
        out[next(iter(s["sources"]))] = s["span_record"]["runs_written"]
    return out


def _clean_outputs(cache: Path) -> dict:
    out = {}
    for manifest in sorted((cache / "clean").glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        ((name, parts),) = m["docs"].items()
        out[name] = ([(cache / p).read_bytes() for p in parts], m["stats"])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    sources = _corpus(root)
    # Each source is compared with its record spilled in one run and held in memory in the other.
    split = prepare_data(_cfg(root / "split", _with(sources, {"web", "books"}, SPILL)), console=QUIET)
    # max_docs (above every source's count) keeps each source in one task: the reference.
    whole = prepare_data(_cfg(root / "whole", _with(sources, {"tables"}, SPILL), max_docs=10**6), console=QUIET)
    return root, split, whole


def test_split_read_and_clean_equals_one_task_per_source(runs):
    root, split, whole = runs
    (job,) = (root / "split" / "_logs" / "clean-files").iterdir()
    assert len(list((job / "completions").iterdir())) >= 7  # every source was cut into runs of files
    assert not (root / "whole" / "_logs" / "clean-files").exists()
    got, want = _clean_outputs(root / "split"), _clean_outputs(root / "whole")
    assert set(got) == {"web", "books", "tables", "dump", "sheet"}
    for name in got:
        assert got[name][0] == want[name][0], name  # the documents, their ids and order
        assert got[name][1] == want[name][1], name  # the counts, reasons and bad records
    for p in Path(split.shard_dir).iterdir():
        if p.suffix in (".bin", ".idx"):
            assert p.read_bytes() == (Path(whole.shard_dir) / p.name).read_bytes(), p.name
    web = got["web"][1]
    # The rule was at work across the runs, in each of its outcomes.
    assert web["reasons"]["lines_repeated_span"] > 200 and web["reasons"]["repeated_spans_left_for_dedup"] > 50
    assert web["reasons"]["few_sentences"] > 10 and web["reasons"]["too_short"] > 10 and web["reasons"]["lines_dropped"] > 100
    assert web["bad_records"] == 2 and web["bad_record_kinds"] == {"empty_text": 1, "invalid_json": 1}
    assert got["books"][1]["reasons"]["lines_repeated_span"] > 200 and got["tables"][1]["reasons"]["lines_repeated_span"] > 100
    # The large files' bad records, placed by file line (and row) across their parts.
    dump, sheet = got["dump"][1], got["sheet"][1]
    assert dump["bad_record_kinds"] == {"empty_text": 1, "invalid_json": 2, "not_an_object": 1}, dump
    assert [e.split("all.jsonl ")[1] for e in dump["bad_record_examples"]] == [
        "line 162: invalid_json", "line 304: empty_text", "line 448: invalid_json", "line 595: not_an_object"]
    assert sheet["bad_record_examples"] == [f"{root / 'sheet' / 'all.parquet'} row 201: null_text"]
    assert dump["reasons"]["lines_repeated_span"] > 200 and sheet["reasons"]["lines_repeated_span"] > 100
    assert not list((root / "split" / "clean-files").glob("*")), "the runs' intermediate files are removed"
    # The spilled records went to disk (and their folders went after): split and one-task paths.
    spilled, held = _span_runs(root / "split"), _span_runs(root / "whole")
    assert spilled["web"] > 5 and spilled["books"] > 5 and held["tables"] > 5, (spilled, held)
    assert spilled["tables"] == held["web"] == held["books"] == 0, (spilled, held)
    assert not [p for p in root.rglob(".spans.tmp-*")]


def test_large_files_are_read_in_parts(runs):
    """The plan: the JSONL file cut into byte ranges, the Parquet file into row-group ranges."""
    from types import SimpleNamespace

    from pretrain.data.config import SourceConfig
    from pretrain.data.stages import _file_runs

    root, _, _ = runs
    run = SimpleNamespace(cfg=SimpleNamespace(root=None), task_bytes=lambda total: 100_000)
    dump = _file_runs(run, 3, SourceConfig(name="dump", path=str(root / "dump")))
    size = (root / "dump" / "all.jsonl").stat().st_size
    assert len(dump) >= 4 and [u[:3] for u in dump] == [[3, 0, 1]] * len(dump)
    assert dump[0][3] == 0 and dump[-1][4] == size and all(a[4] == b[3] for a, b in zip(dump, dump[1:]))
    sheet = _file_runs(run, 4, SourceConfig(name="sheet", path=str(root / "sheet")))
    assert len(sheet) >= 2 and sheet[0][3] == 0 and sheet[-1][4] == 11
    assert all(a[4] == b[3] for a, b in zip(sheet, sheet[1:]))


def test_a_bad_record_in_a_later_part_is_named_by_its_file_line(runs, tmp_path):
    root, _, _ = runs
    sources = [{"name": "dump", "path": str(root / "dump")}]  # on_bad_record: error
    with pytest.raises(DataConfigError, match=r"data\.sources\[0\] \(source 'dump'\): .*all\.jsonl line 162: not valid JSON"):
        prepare_data(_cfg(tmp_path / "cache", sources), console=QUIET)


def test_a_bad_record_in_a_later_run_is_named_as_before(runs, tmp_path):
    root, _, _ = runs
    sources = [{"name": "web", "path": str(root / "web")}]  # on_bad_record: error
    with pytest.raises(DataConfigError, match=r"data\.sources\[0\] \(source 'web'\): .*part-3\.jsonl line 11: not valid JSON"):
        prepare_data(_cfg(tmp_path / "cache", sources), console=QUIET)
