"""Per-stage, per-source counts of documents and bytes kept and dropped, and their printing."""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Sequence, Tuple

Doc = Tuple[str, str]


def nbytes(docs: Sequence[Doc]) -> int:
    return sum(len(t.encode("utf-8")) for _, t in docs)


def stage_counts(docs_in: int, bytes_in: int, docs_out: int, bytes_out: int, reasons=None) -> dict:
    """Docs/bytes in and out; ``reasons`` counts why documents (or parts) were dropped or changed."""
    return {
        "docs_in": docs_in,
        "docs_out": docs_out,
        "docs_dropped": docs_in - docs_out,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "bytes_dropped": bytes_in - bytes_out,
        "reasons": dict(reasons or {}),
    }


def stage_stats(before: Sequence[Doc], after: Sequence[Doc], reasons: Counter | None = None) -> dict:
    """stage_counts of two lists of documents."""
    return stage_counts(len(before), nbytes(before), len(after), nbytes(after), reasons)


def print_stage_table(console, stage: str, stats: Dict[str, dict], note: str = "") -> None:
    from rich.table import Table

    table = Table(title=f"{stage}{' (' + note + ')' if note else ''}", title_justify="left")
    # The read stage also counts the bad records it dropped (on_bad_record: drop), by kind.
    with_bad = any("bad_records" in s for s in stats.values())
    cols = ["source", "docs in", "docs out", "MB in", "MB out", "dropped / changed"] + (["bad records dropped"] if with_bad else [])
    for col in cols:
        table.add_column(col, justify="left" if col in ("source", "dropped / changed", "bad records dropped") else "right")
    for name, s in stats.items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["reasons"].items()) if v)
        row = [name, f"{s['docs_in']:,}", f"{s['docs_out']:,}", f"{s['bytes_in'] / 1e6:.2f}", f"{s['bytes_out'] / 1e6:.2f}", reasons or "-"]
        if with_bad:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(s.get("bad_record_kinds", {}).items()))
            row.append(f"{s.get('bad_records', 0):,}" + (f" ({kinds})" if kinds else ""))
        table.add_row(*row)
    console.print(table)


def docs_summary(docs_by_source: Dict[str, List[Doc]]) -> str:
    return ", ".join(f"{n}: {len(d):,} docs" for n, d in docs_by_source.items())
