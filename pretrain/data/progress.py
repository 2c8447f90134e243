"""Per-stage progress in the console (documents, MB, MB/s, tokens/s, ETA) and the stats JSON each
stage writes beside its output (``stats.json``: counts, seconds and rates)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

STATS_FILE = "stats.json"


class StageProgress:
    """One stage's progress bar, drawn by tqdm: MB done (of ``total_bytes`` when known, which gives
    the ETA), MB/s, and the documents (and tokens, tokens/s) so far in its postfix. The driver
    advances it as tasks finish."""

    def __init__(self, desc: str, total_bytes: Optional[int], enabled: bool, tokens: bool = False, file=None):
        self.enabled, self.tokens = enabled, tokens
        self.docs = self.ntokens = 0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, leave=False, mininterval=0.5,
                            file=file)

    def add(self, docs: int, nbytes: int, tokens: int = 0) -> None:
        """``docs`` documents of ``nbytes`` bytes (and ``tokens`` tokens) passed the stage."""
        if not self.enabled:
            return
        self.docs += docs
        self.ntokens += tokens
        self.bar.update(nbytes)
        post = {"docs": f"{self.docs:,}"}
        if self.tokens:
            rate = self.bar.format_dict["rate"] or 0.0
            per_byte = self.ntokens / max(self.bar.n, 1)
            post.update(tokens=f"{self.ntokens:,}", tokens_per_s=f"{rate * per_byte:,.0f}")
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_stage_stats(folder: Path, stage: str, sources: Dict[str, dict], seconds: float, **extra) -> dict:
    """Write ``folder/stats.json``: the stage's per-source counts (stats.stage_stats), its wall time,
    and documents/s and MB/s over its input (plus ``extra``, e.g. tokens and tokens/s)."""
    docs = sum(s.get("docs_in", 0) for s in sources.values())
    nbytes = sum(s.get("bytes_in", 0) for s in sources.values())
    out = {
        "stage": stage,
        "seconds": round(seconds, 3),
        "docs_in": docs,
        "bytes_in": nbytes,
        "docs_per_s": round(docs / max(seconds, 1e-9), 1),
        "mb_per_s": round(nbytes / 1e6 / max(seconds, 1e-9), 3),
        **extra,
        "sources": sources,
    }
    (folder / STATS_FILE).write_text(json.dumps(out, indent=1))
    return out


def read_stage_stats(folder: Path) -> Optional[dict]:
    path = folder / STATS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
