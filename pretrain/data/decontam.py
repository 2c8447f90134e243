"""Stage 4, decontamination against evaluation sets, as in GPT-3 (and lm-eval's janitor).

Words are whitespace-split, lower-cased, with punctuation removed. Every 13-gram of a training
document found in an evaluation file is a hit: the hit plus ``window_chars`` characters on each
side is cut out and the document split there (overlapping cuts merge into one). A document cut
more than ``max_splits`` times is dropped; fragments shorter than ``min_fragment_chars`` too.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

import numpy as np

from pretrain.data.config import DecontamConfig

Doc = Tuple[str, str]
_PUNCT = str.maketrans("", "", string.punctuation + "\u2018\u2019\u201c\u201d")
_WORD = re.compile(r"\S+")


def _words_with_spans(text: str) -> Tuple[List[str], List[Tuple[int, int]]]:
    words, spans = [], []
    for m in _WORD.finditer(text):
        w = m.group().lower().translate(_PUNCT)
        if w:
            words.append(w)
            spans.append(m.span())
    return words, spans


def normalized_words(text: str) -> List[str]:
    """The same words as _words_with_spans, without positions (fast path)."""
    return text.lower().translate(_PUNCT).split()


def word_hashes(words: Sequence[str]) -> np.ndarray:
    """``hash()`` of every word as uint64 (salted per process: compare hashes within one process only)."""
    return np.fromiter((hash(w) for w in words), dtype=np.int64, count=len(words)).view(np.uint64)


def roll_ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit polynomial hash of every n consecutive word hashes (vectorised); len(hashes) - n + 1 of them."""
    m = len(hashes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    g = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            g = g * np.uint64(1_000_003) + hashes[k : k + m]
    return g


def ngram_hashes(words: Sequence[str], n: int) -> np.ndarray:
    """The hash of every n-gram of ``words``, in order (see roll_ngram_hashes)."""
    return roll_ngram_hashes(word_hashes(words), n)


def ngrams_of(text: str, n: int) -> np.ndarray:
    """Sorted unique n-gram hashes of a text (words lower-cased, punctuation removed)."""
    return np.unique(ngram_hashes(normalized_words(text), n))


def read_eval_texts(paths: Sequence[str]) -> Iterable[str]:
    """Evaluation files: JSONL (field "text", else every string value) or plain text (whole file)."""
    for p in map(Path, paths):
        if p.suffix in (".jsonl", ".json"):
            for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    yield rec["text"] if "text" in rec else " ".join(v for v in rec.values() if isinstance(v, str))
        else:
            yield p.read_text(encoding="utf-8", errors="replace")


def build_eval_ngrams(paths: Sequence[str], n: int) -> np.ndarray:
    parts = [ngrams_of(text, n) for text in read_eval_texts(paths)]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def hits(grams: np.ndarray, eval_ngrams: np.ndarray) -> np.ndarray:
    """Which of ``grams`` (n-gram hashes) are in the sorted ``eval_ngrams``: a bool per gram."""
    if not len(grams) or not len(eval_ngrams):
        return np.zeros(len(grams), dtype=bool)
    pos = np.searchsorted(eval_ngrams, grams).clip(max=len(eval_ngrams) - 1)
    return eval_ngrams[pos] == grams


def is_contaminated(text: str, eval_ngrams: np.ndarray, n: int) -> bool:
    """Whether any n-gram of ``text`` is in the sorted ``eval_ngrams`` (the fast first test)."""
    return bool(hits(ngram_hashes(normalized_words(text), n), eval_ngrams).any())


def decontaminate_document(text: str, eval_ngrams: np.ndarray, cfg: DecontamConfig) -> Tuple[List[str], int]:
    """Return (clean fragments, number of cuts); an empty list means the document is dropped.

    ``eval_ngrams``: sorted n-gram hashes from build_eval_ngrams / ngrams_of.
    """
    n = cfg.ngram
    if not is_contaminated(text, eval_ngrams, n):
        return [text], 0
    words, spans = _words_with_spans(text)
    cuts: List[List[int]] = []
    for i in np.flatnonzero(hits(ngram_hashes(words, n), eval_ngrams)):
        start = max(0, spans[i][0] - cfg.window_chars)
        end = min(len(text), spans[i + n - 1][1] + cfg.window_chars)
        if cuts and start <= cuts[-1][1]:
            cuts[-1][1] = max(cuts[-1][1], end)
        else:
            cuts.append([start, end])
    if not cuts:
        return [text], 0
    if len(cuts) > cfg.max_splits:
        return [], len(cuts)
    pieces, pos = [], 0
    for start, end in cuts:
        pieces.append(text[pos:start])
        pos = end
    pieces.append(text[pos:])
    return [p.strip() for p in pieces if len(p.strip()) >= cfg.min_fragment_chars], len(cuts)


def decontaminate(docs: Iterable[Doc], eval_ngrams: np.ndarray, cfg: DecontamConfig) -> Tuple[List[Doc], Counter]:
    out, c = [], Counter()
    for doc_id, text in docs:
        pieces, ncuts = decontaminate_document(text, eval_ngrams, cfg)
        if ncuts:
            c["contaminated_docs"] += 1
            c["cuts"] += ncuts
            if not pieces:
                c["dropped_docs"] += 1
        out.extend((doc_id if len(pieces) == 1 and not ncuts else f"{doc_id}#{k}", p) for k, p in enumerate(pieces))
    return out, c
