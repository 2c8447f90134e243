"""Read + clean's tasks: a source in one task, or (a source of several files, or of a large one) in two steps.

C4's repeated-span rule looks back over everything a source has kept so far, and a document's id
is its index among the source's records; both are sequential. Everything else looks at one
document, so a source of several files, or of a file larger than a chunk, is cleaned in two steps:

- ``clean-files``, a task per run of files or per part of a large file (``stages._file_runs``
  cuts them; ``file_parts.py``): reads the records, applies
  every rule up to the span pass (``clean.before_spans``), collapses blank lines and hashes the
  spans of each line that can hold one. It writes ``pre-NNNNN.jsonl``, a line per record that
  reached the span pass: a JSON header (its index in the run ``i``, its text's UTF-8 bytes ``n``;
  for a document with spans, each such line's index, length and span count ``l`` and, when the
  rules after the pass drop it unless the pass removes a line, why ``v``), a tab, and its text as
  the JSON string the output will hold: the final text unless the span pass removes a line.
  The span hashes (``uint64``) go to ``pre-NNNNN.bin`` in the same order.
- ``clean``, a task per source: reads the runs in order, numbers the documents and does the span
  pass; a document it leaves unchanged is copied through without decoding its text. Its output
  equals the one-task path's, byte for byte.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterator, List

import numpy as np

from pretrain.data.stats import stage_counts
from pretrain.data.tasks import PART, Counted, config, write_encoded_part, write_part

PRE = "pre-{:05d}"


def clean_files_task(ctx: dict, unit: list, folder: Path, rank: int) -> dict:
    """The rules up to the span pass, over files [first, end) of source ``index``, or over part
    [start, end) of its file ``first`` (unit: [index, first, end] or [index, first, first + 1, start, end])."""
    from pretrain.data.clean import after_spans, before_spans, collapse_blank_lines, spanned_lines
    from pretrain.data.records import BadRecords
    from pretrain.data.sources import read_files, read_part, source_files
    from pretrain.data.validation import effective_stages

    cfg = config(ctx)
    index, first, end, *cut = unit
    src, key = cfg.sources[index], f"data.sources[{index}]"
    c = effective_stages(cfg, src).clean
    fmt, files = source_files(src, cfg.root, key)
    why, part = Counter(), None
    if cut:
        bad, texts, part = read_part(src, fmt, files[first], key, c.max_invalid_utf8_fraction, *cut)
    else:
        bad = BadRecords(src, key)
        texts = read_files(src, fmt, files[first:end], bad, c.max_invalid_utf8_fraction)
    records = Counted(enumerate(texts))
    base = folder / src.name / PRE.format(rank)
    base.parent.mkdir(parents=True, exist_ok=True)
    tmp = base.with_name(f".{base.name}.tmp-{uuid.uuid4().hex[:8]}")

    def line(head: dict, text: str) -> str:
        return f"{json.dumps({**head, 'n': len(text.encode('utf-8'))})}\t{json.dumps(text, ensure_ascii=False)}\n"

    with open(f"{tmp}.jsonl", "w", encoding="utf-8") as out, open(f"{tmp}.bin", "wb") as hashes:
        for k, text in records:
            if not c.enabled:
                out.write(line({"i": k}, text))
                continue
            text, w = before_spans(text, c)
            why.update(w)
            if text is None:
                continue
            spanned = []
            if c.dedup_sentence_spans:  # line indices are the collapsed text's (see clean.repeated_lines)
                text = collapse_blank_lines(text)
                spanned = spanned_lines(text)
            if not spanned:  # nothing for the span pass to do: finish here
                text = after_spans(text, c, c.dedup_sentence_spans, why)[0]
                if text is not None:
                    out.write(line({"i": k}, text))
                continue
            verdict: Counter = Counter()
            after_spans(text, c, True, verdict)
            head = {"i": k, "l": [[i, length, len(h)] for i, length, h in spanned]}
            if verdict:
                head["v"] = next(iter(verdict))
            out.write(line(head, text))
            hashes.write(np.array([h for _, _, hs in spanned for h in hs], dtype=np.uint64).tobytes())
    os.replace(f"{tmp}.bin", f"{base}.bin")
    os.replace(f"{tmp}.jsonl", f"{base}.jsonl")
    return {"source": src.name, "records": records.n, "bytes": records.nbytes, "why": dict(why), "bad": bad.summary(),
            "lines": part.lines if part else None, "progress": {"docs": records.n, "bytes": records.nbytes}}


def clean_task(ctx: dict, unit: int, folder: Path, rank: int) -> dict:
    """Read + clean of source ``unit``: in this task, or the span pass over its ``clean-files`` runs
    (``ctx["pre"][name]``: their folder, ranks and results)."""
    from pretrain.data.clean import clean_document
    from pretrain.data.records import BadRecords
    from pretrain.data.sources import read_source
    from pretrain.data.validation import effective_stages

    cfg = config(ctx)
    src = cfg.sources[unit]
    c = effective_stages(cfg, src).clean
    if src.name in ctx.get("pre", {}):
        return _span_pass(ctx, src.name, c, folder)
    key = f"data.sources[{unit}]"
    bad = BadRecords(src, key)
    raw = Counted(read_source(src, cfg.root, key=key, bad=bad, max_invalid_utf8_fraction=c.max_invalid_utf8_fraction))
    why = Counter()

    def cleaned(seen) -> Iterator:
        for doc_id, text in raw:
            if not c.enabled:
                yield doc_id, text
                continue
            out, w = clean_document(text, c, seen)
            why.update(w)
            if out is not None:
                yield doc_id, out

    with span_record(c, folder / src.name) as seen:  # C4's repeated-span rule looks back over the whole source
        n, nbytes = write_part(folder / src.name / PART.format(0), cleaned(seen))
        record = span_record_stats(seen)
    return {"source": src.name, "stats": {**stage_counts(raw.n, raw.nbytes, n, nbytes, sorted_counts(why)), **bad.summary()},
            "span_record": record, "progress": {"docs": raw.n, "bytes": raw.nbytes}}


def span_record(c, folder: Path):
    """A source's span record: ``c.spans_in_memory`` spans in memory, the rest in sorted runs in a
    temporary folder of the task's (removed at the end; a killed task's goes at publish)."""
    from pretrain.data.clean import SpanSet

    return SpanSet(in_memory=c.spans_in_memory, spill=folder / f".spans.tmp-{uuid.uuid4().hex[:8]}")


def span_record_stats(seen) -> dict:
    return {"spans": len(seen), "runs_written": seen.runs_written}


def _span_pass(ctx: dict, name: str, c, folder: Path) -> dict:
    from pretrain.data.clean import after_spans, repeated_lines, without_lines

    pre, root = ctx["pre"][name], Path(ctx["root"])
    why = Counter()

    def docs(seen) -> Iterator:
        offset = 0
        for rank, res in zip(pre["ranks"], pre["results"]):
            base = root / pre["dir"] / PRE.format(rank)
            with open(f"{base}.jsonl", encoding="utf-8") as records, open(f"{base}.bin", "rb") as hashes:
                for line in records:
                    head, _, encoded = line.partition("\t")
                    d = json.loads(head)
                    doc_id, encoded = str(offset + d["i"]), encoded.rstrip("\n")
                    if "l" not in d:
                        yield doc_id, encoded, d["n"]
                        continue
                    flat = np.frombuffer(hashes.read(8 * sum(n for _, _, n in d["l"])), dtype=np.uint64).tolist()
                    spanned, at = [], 0
                    for i, length, n in d["l"]:
                        spanned.append((i, length, flat[at : at + n]))
                        at += n
                    repeated = repeated_lines(spanned, c, seen, why)
                    if not repeated:
                        if "v" in d:
                            why[d["v"]] += 1
                        else:
                            yield doc_id, encoded, d["n"]
                        continue
                    text = after_spans(without_lines(json.loads(encoded), repeated), c, True, why)[0]
                    if text is not None:
                        yield doc_id, json.dumps(text, ensure_ascii=False), len(text.encode("utf-8"))
            offset += res["records"]

    with span_record(c, folder / name) as seen:
        n, nbytes = write_encoded_part(folder / name / PART.format(0), docs(seen))
        record = span_record_stats(seen)
    results = pre["results"]
    for res in results:
        why.update(res["why"])
    records, raw_bytes = sum(r["records"] for r in results), sum(r["bytes"] for r in results)
    return {"source": name, "stats": {**stage_counts(records, raw_bytes, n, nbytes, sorted_counts(why)),
                                      **merged_bad_records(results)},
            "span_record": record, "progress": {"docs": 0, "bytes": 0}}


def sorted_counts(counts: Counter) -> dict:
    """A stage's reasons in a fixed order (whichever way the source was split, the same stats)."""
    return dict(sorted(counts.items()))


def merged_bad_records(results: List[dict]) -> dict:
    """One source's BadRecords.summary() from its runs' results (in order): a JSONL part's dropped
    records are placed after the lines of the same file's earlier parts."""
    from pretrain.data.records import example

    kinds, examples, lines_before = Counter(), [], Counter()
    for r in results:
        s = r["bad"]
        kinds.update(s["bad_record_kinds"])
        examples += s["bad_record_examples"] + [example(*e, lines_before[r["file"]]) for e in s.get("bad_record_lines", [])]
        lines_before[r["file"]] += r.get("lines") or 0
    return {"bad_records": sum(r["bad"]["bad_records"] for r in results), "bad_record_kinds": dict(sorted(kinds.items())),
            "bad_record_examples": examples[:10]}
