"""Stage 1, cleaning: Unicode normalisation, invalid UTF-8, C4 heuristics, GPT-3's 200-character minimum.

C4 (Raffel et al. 2020) rules, as applied here:
- lines: keep lines ending in terminal punctuation with at least ``min_words_per_line`` words;
  drop lines mentioning "javascript";
- pages: drop pages with "lorem ipsum" or a curly brace, and pages left with fewer than
  ``min_sentences`` sentences;
- repeated three-sentence spans: a line holding a span of three sentences already seen in the
  same source is removed (C4 keeps the first occurrence). A document made mostly of such lines
  (``max_repeated_span_fraction`` of its characters) is a copy or near-copy of an earlier one:
  it is left whole, its spans not recorded, and the dedup stage judges it as a document.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, List, Optional, Set, Tuple

import numpy as np

from pretrain.data.config import CleanConfig

Doc = Tuple[str, str]

EOD_LITERAL = "<|endoftext|>"
_TERMINAL = (".", "!", "?", '"', "'", "\u201d", "\u2019")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)]*\s+")
_LOREM = re.compile(r"lorem ipsum", re.I)
_JS = re.compile(r"javascript", re.I)


def split_sentences(text: str) -> List[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _has_two_ends(line: str) -> bool:
    return len(_SENTENCE_END.findall(line)) >= 2


def _span_hashes(sentences: List[str]) -> List[int]:
    norm = [" ".join(s.lower().split()) for s in sentences]
    return [int.from_bytes(hashlib.blake2b("\n".join(norm[i : i + 3]).encode(), digest_size=8).digest(), "little")
            for i in range(len(norm) - 2)]


class SpanSet:
    """The spans a source has recorded (64-bit hashes), 8 bytes each: a sorted array and a small set
    of the latest, merged into the array when it holds ``buffer`` (a Python set of them costs about
    80 bytes a span, which at corpus scale is gigabytes).

    With ``spill`` (a folder to create) and ``in_memory``, the array never holds more than about
    ``in_memory`` spans: beyond, it is written to ``spill`` as a sorted run and looked up
    memory-mapped. Runs of similar size are merged (a block at a time), so a record of N spans is
    O(log(N / in_memory)) runs. The answers do not depend on either setting. ``close()`` (or
    leaving a ``with`` block) removes the folder."""

    def __init__(self, buffer: int = 1 << 18, in_memory: Optional[int] = None, spill: Optional[Path] = None):
        self._sorted = np.zeros(0, dtype=np.uint64)
        self._recent: Set[int] = set()
        self._limit = in_memory if spill is not None else None
        self._buffer = buffer if self._limit is None else max(1, min(buffer, self._limit // 4))
        self._spill, self._runs, self._written = spill, [], 0

    def __contains__(self, v: int) -> bool:
        return v in self._recent or bool(self.isin(np.array([v], dtype=np.uint64))[0])

    def isin(self, values: np.ndarray) -> np.ndarray:
        """``v in self`` for each of ``values`` (uint64), at once."""
        hit = np.zeros(len(values), dtype=bool)
        for record in (self._sorted, *self._runs):
            if len(record):
                hit |= record[np.minimum(np.searchsorted(record, values), len(record) - 1)] == values
        if self._recent:
            hit |= np.fromiter((v in self._recent for v in values.tolist()), dtype=bool, count=len(values))
        return hit

    def update(self, hashes: Iterable[int]) -> None:
        self._recent.update(hashes)
        if len(self._recent) >= self._buffer:
            new = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            new.sort()
            self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, new), new)
            self._recent.clear()
            if self._limit is not None and len(self._sorted) >= self._limit:
                self._spill_sorted()

    def _spill_sorted(self) -> None:
        self._spill.mkdir(parents=True, exist_ok=True)
        self._runs.append(self._save(lambda f: f.write(self._sorted.tobytes())))
        self._sorted = np.zeros(0, dtype=np.uint64)
        while len(self._runs) >= 2 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            a, b = self._runs[-2], self._runs[-1]
            merged = self._save(lambda f: _merge_sorted(a, b, f, self._buffer))
            for run in (a, b):
                os.unlink(run.filename)
            self._runs[-2:] = [merged]

    def _save(self, write) -> np.ndarray:
        path = self._spill / f"run-{self._written:05d}.u64"
        self._written += 1
        with open(path, "wb") as f:
            write(f)
        return np.memmap(path, dtype=np.uint64, mode="r")

    @property
    def runs_written(self) -> int:
        """Sorted runs written to disk so far (merges included)."""
        return self._written

    def close(self) -> None:
        self._runs = []
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)

    def __enter__(self) -> "SpanSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent) + sum(len(r) for r in self._runs)


def _merge_sorted(a: np.ndarray, b: np.ndarray, out, block: int) -> None:
    """Write sorted ``a`` and ``b`` (memory-mapped) to ``out`` as one sorted run, holding about
    ``2 * block`` values at a time: each step takes both arrays' values up to the smaller of their
    next ``block``-th values."""
    i = j = 0
    while i < len(a) and j < len(b):
        pivot = min(a[min(i + block, len(a)) - 1], b[min(j + block, len(b)) - 1])
        ia, jb = int(np.searchsorted(a, pivot, "right")), int(np.searchsorted(b, pivot, "right"))
        step = np.concatenate([a[i:ia], b[j:jb]])
        step.sort()
        out.write(step.tobytes())
        i, j = ia, jb
    for rest, k in ((a, i), (b, j)):
        for at in range(k, len(rest), block):
            out.write(np.asarray(rest[at : at + block]).tobytes())


# A line that can hold a three-sentence span: (its index, its stripped length, its spans' hashes).
SpannedLine = Tuple[int, int, List[int]]


def clean_document(text: str, cfg: CleanConfig, seen_spans: Optional[Set[int] | SpanSet] = None) -> Tuple[Optional[str], Counter]:
    """Return (cleaned text or None if dropped, counts of what happened)."""
    text, why = before_spans(text, cfg)
    if text is None:
        return None, why
    spans = cfg.dedup_sentence_spans and seen_spans is not None
    if spans:
        text = without_repeated_spans(text, spanned_lines(text), cfg, seen_spans, why)
    return after_spans(text, cfg, spans, why)


def before_spans(text: str, cfg: CleanConfig) -> Tuple[Optional[str], Counter]:
    """The rules that look at one document only, up to the repeated-span pass: invalid UTF-8, the
    end-of-text literal, Unicode normalisation, C4's page and line rules."""
    why: Counter = Counter()
    bad = text.count("\ufffd")
    if bad:
        if bad > cfg.max_invalid_utf8_fraction * max(len(text), 1):
            why["invalid_utf8"] += 1
            return None, why
        why["utf8_repaired"] += 1
    if EOD_LITERAL in text:  # would collide with the end-of-text token at tokenization
        text = text.replace(EOD_LITERAL, "")
        why["eod_literal_removed"] += 1
    if cfg.unicode_form.lower() != "none":
        normalized = unicodedata.normalize(cfg.unicode_form.upper(), text)
        if normalized != text:
            why["unicode_normalized"] += 1
        text = normalized
    text = text.replace("\r\n", "\n").replace("\r", "\n")

    if cfg.c4_page:
        if _LOREM.search(text):
            why["lorem_ipsum"] += 1
            return None, why
        if cfg.drop_curly_braces and ("{" in text or "}" in text):
            why["curly_brace"] += 1
            return None, why
    if cfg.c4_lines:
        kept = []
        for line in text.split("\n"):
            s = line.strip()
            if not s:
                kept.append("")  # paragraph breaks survive
                continue
            if not s.endswith(_TERMINAL) or len(s.split()) < cfg.min_words_per_line:
                why["lines_dropped"] += 1
                continue
            if _JS.search(s):
                why["lines_javascript"] += 1
                continue
            kept.append(line.rstrip())
        text = "\n".join(kept)
    return text, why


def after_spans(text: str, cfg: CleanConfig, spans: bool, why: Counter) -> Tuple[Optional[str], Counter]:
    """The rules after the span pass (``spans``: whether it ran): blank runs collapsed, C4's sentence
    minimum, GPT-3's length minimum."""
    if cfg.c4_lines or spans:
        text = collapse_blank_lines(text)
    if cfg.c4_page and len(split_sentences(text)) < cfg.min_sentences:
        why["few_sentences"] += 1
        return None, why
    if len(text) < cfg.min_chars:
        why["too_short"] += 1
        return None, why
    return text, why


def spanned_lines(text: str) -> List[SpannedLine]:
    """The lines of ``text`` that hold a three-sentence span, with their spans' hashes."""
    out = []
    for i, line in enumerate(text.split("\n")):
        s = line.strip()
        # Three sentences need at least two sentence ends inside the line: most lines have not.
        if _has_two_ends(s):
            out.append((i, len(s), _span_hashes(split_sentences(s))))
    return out


def without_repeated_spans(text: str, spanned: List[SpannedLine], cfg: CleanConfig, seen_spans: Set[int] | SpanSet,
                           why: Counter) -> str:
    """``text`` less its lines holding a three-sentence span seen before (in ``seen_spans`` or earlier
    in this document), recording the spans it keeps; or ``text`` whole, nothing recorded, when those
    lines are more than ``max_repeated_span_fraction`` of the characters of its lines of three or
    more sentences. ``spanned`` is ``spanned_lines(text)``."""
    repeated = repeated_lines(spanned, cfg, seen_spans, why)
    return without_lines(text, repeated) if repeated else text


def repeated_lines(spanned: List[SpannedLine], cfg: CleanConfig, seen_spans: Set[int] | SpanSet, why: Counter) -> Set[int]:
    """The lines without_repeated_spans removes (none when the document is left whole), recording
    the spans it keeps. Blank lines do not count, so the indices may be those of the text before or
    after collapse_blank_lines: the result, collapsed, is the same."""
    flat = [h for _, _, spans in spanned for h in spans]
    if isinstance(seen_spans, SpanSet):
        seen = seen_spans.isin(np.array(flat, dtype=np.uint64)).tolist()
    else:
        seen = [h in seen_spans for h in flat]
    repeated, new_spans, chars, spanned_chars, at = set(), set(), {}, 0, 0
    for i, length, spans in spanned:
        spanned_chars += length
        chars[i] = length
        if any(seen[at : at + len(spans)]) or any(h in new_spans for h in spans):
            repeated.add(i)
        else:
            new_spans.update(spans)
        at += len(spans)
    if not repeated:
        seen_spans.update(new_spans)
        return repeated
    # The share among the lines that can hold a span: shorter lines say nothing either way.
    if sum(chars[i] for i in repeated) > cfg.max_repeated_span_fraction * spanned_chars:
        why["repeated_spans_left_for_dedup"] += 1
        return set()
    seen_spans.update(new_spans)
    why["lines_repeated_span"] += len(repeated)
    return repeated


def without_lines(text: str, lines: Set[int]) -> str:
    return "\n".join(line for i, line in enumerate(text.split("\n")) if i not in lines)


def collapse_blank_lines(text: str) -> str:
    """Runs of blank lines become one; none at the start or the end."""
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def clean_documents(docs: Iterable[Doc], cfg: CleanConfig) -> Tuple[List[Doc], Counter]:
    """Clean one source's documents; span deduplication is within the source."""
    seen = SpanSet()
    out, counts = [], Counter()
    for doc_id, text in docs:
        cleaned, why = clean_document(text, cfg, seen)
        counts.update(why)
        if cleaned is not None:
            out.append((doc_id, cleaned))
    return out, counts
