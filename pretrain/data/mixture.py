"""Mixture weights from per-source weights or epochs, and the GPT-3 Table 2.2 style report.

Units: tokens. For a planned budget B (training tokens) and a source with T training tokens and
weight w (its share of training samples), epochs elapsed = w * B / T.

Resolution rules:
- no source gives weight or epochs: weights are proportional to tokens (the natural mixture);
- otherwise each source gives one of them; a source with ``epochs: e`` takes the share
  e * T / B, and the sources with ``weight`` share what is left in proportion to their weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from pretrain.data.sources import DataConfigError


def split_fractions(split: str) -> List[float]:
    try:
        parts = [float(x) for x in str(split).replace("/", ",").split(",")]
    except ValueError:
        raise DataConfigError(f"data.split={split!r}: expected three numbers such as '949,50,1'") from None
    parts += [0.0] * (3 - len(parts))
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DataConfigError(f"data.split={split!r}: expected three non-negative numbers with a positive sum")
    return [p / sum(parts) for p in parts]


def check_weights(sources: Sequence) -> None:
    """Fail early on weights/epochs that cannot make a mixture (before any work starts)."""
    given = [s for s in sources if s.weight is not None or s.epochs is not None]
    for s in sources:
        if s.weight is not None and s.epochs is not None:
            raise DataConfigError(f"data.sources[{s.name}]: give weight or epochs, not both")
        if s.weight is not None and s.weight < 0:
            raise DataConfigError(f"data.sources[{s.name}].weight={s.weight} is negative")
        if s.epochs is not None and s.epochs <= 0:
            raise DataConfigError(f"data.sources[{s.name}].epochs={s.epochs} must be positive")
    if given and len(given) != len(sources):
        missing = [s.name for s in sources if s.weight is None and s.epochs is None]
        raise DataConfigError(f"data.sources {missing}: give every source a weight or epochs, or none of them")
    if given and all(s.epochs is None for s in sources) and sum(s.weight for s in sources) <= 0:
        raise DataConfigError("data.sources: the weights sum to zero; give at least one positive weight")


def resolve_weights(sources: Sequence, train_tokens: Dict[str, int], budget: int) -> Dict[str, float]:
    check_weights(sources)
    if all(s.weight is None and s.epochs is None for s in sources):
        total = sum(train_tokens.values())
        return {s.name: train_tokens[s.name] / total for s in sources}
    shares = {s.name: s.epochs * train_tokens[s.name] / budget for s in sources if s.epochs is not None}
    left = 1.0 - sum(shares.values())
    weighted = [s for s in sources if s.epochs is None]
    if left < -1e-9 or (weighted and left <= 0):
        raise DataConfigError(
            f"data.sources: the epochs asked for take {1 - left:.0%} of the token budget ({budget:,}); "
            f"lower them or raise data.token_budget"
        )
    wsum = sum(s.weight for s in weighted)
    if weighted and wsum <= 0:
        raise DataConfigError("data.sources: the weights sum to zero; give at least one positive weight")
    for s in weighted:
        shares[s.name] = left * s.weight / wsum
    total = sum(shares.values())
    return {s.name: shares[s.name] / total for s in sources}


def mixture_report(
    sources: Sequence,
    tokens: Dict[str, int],
    split: str,
    budget: Optional[int],
    max_epochs: float,
    bad_records: Optional[Dict[str, int]] = None,
) -> dict:
    """Per source: tokens, training tokens, weight, epochs elapsed at the budget, a repeat flag, and
    the bad records dropped while reading it (``on_bad_record: drop``)."""
    train_frac = split_fractions(split)[0]
    train_tokens = {n: int(t * train_frac) for n, t in tokens.items()}
    for n, t in train_tokens.items():
        if t <= 0:
            raise DataConfigError(f"data.sources[{n}]: no training tokens (is the train split empty?)")
    budget = int(budget or sum(train_tokens.values()))
    weights = resolve_weights(sources, train_tokens, budget)
    rows = []
    for s in sources:
        w = weights[s.name]
        epochs = w * budget / train_tokens[s.name]
        rows.append(
            {
                "source": s.name,
                "tokens": tokens[s.name],
                "train_tokens": train_tokens[s.name],
                "weight": w,
                "epochs": epochs,
                "repeated": epochs > max_epochs,
                "bad_records": int((bad_records or {}).get(s.name, 0)),
            }
        )
    return {"token_budget": budget, "max_epochs_warning": max_epochs, "sources": rows}


def print_report(console, report: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"Mixture for a budget of {report['token_budget']:,} training tokens (GPT-3 Table 2.2 form)",
        title_justify="left",
    )
    for col in ["source", "tokens", "train tokens", "weight in mix", "epochs elapsed", "bad records dropped"]:
        table.add_column(col, justify="left" if col == "source" else "right")
    for r in report["sources"]:
        flag = f" [red]> {report['max_epochs_warning']:g}[/red]" if r["repeated"] else ""
        table.add_row(
            r["source"], f"{r['tokens']:,}", f"{r['train_tokens']:,}", f"{r['weight']:.1%}", f"{r['epochs']:.2f}{flag}",
            f"{r.get('bad_records', 0):,}",
        )
    console.print(table)
    for r in report["sources"]:
        if r["repeated"]:
            console.print(
                f"[yellow]warning:[/yellow] {r['source']} is repeated {r['epochs']:.1f} times "
                f"(more than data.max_epochs_warning={report['max_epochs_warning']:g})"
            )


def write_report(path: Path, report: dict) -> None:
    from pretrain.data.cache import atomic_write_text

    atomic_write_text(path, json.dumps(report, indent=1))
