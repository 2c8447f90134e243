"""Stage 2, quality filtering as in GPT-3: a logistic regression on hashed n-gram features.

Positives are the curated sources' documents, negatives the documents of the sources being
filtered (the "raw" ones). A filtered document is kept when ``pareto(alpha) > 1 - score``
(alpha = 9), so low-scoring documents still survive now and then, as GPT-3 intended.

Bounded memory at any corpus size: the classifier trains on seeded bottom-k samples (the
``max_train_docs`` documents of each class with the smallest keyed hash of their text, the same
whatever the order or number of files), holding only their first ``max_chars`` characters; the
model is two weight vectors (saved as a NumPy ``.npz``, never a pickle); scoring streams documents
in batches. Scores are cross-fitted: each raw document falls in one of two folds by a hash of its
text, and is scored by the classifier whose negatives came from the other fold, so no document is
scored by a model that saw it as a negative. A document's Pareto draw comes from a keyed hash of its
source, id and text, so the kept set does not depend on how the stage is cut into tasks.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import numpy as np

from pretrain.data.config import QualityConfig

Doc = Tuple[str, str]
Model = Dict[str, np.ndarray]  # "coef": [2, n_features] (classifier k scores fold k), "intercept": [2]
_BATCH = 256


def _vectorizer(cfg: QualityConfig):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        n_features=cfg.n_features, ngram_range=(1, cfg.ngram_max), alternate_sign=False, norm="l2", lowercase=True
    )


def _digest(cfg: QualityConfig, *parts: str) -> bytes:
    h = hashlib.blake2b(digest_size=16, key=str(cfg.seed).encode())
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.digest()


def fold_and_priority(head: str, cfg: QualityConfig) -> Tuple[int, int]:
    """A document's cross-fitting fold (0 or 1) and its sampling priority, from its text's head."""
    d = _digest(cfg, head)
    return d[8] & 1, int.from_bytes(d[:8], "little")


class _BottomK:
    """The k items with the smallest priority seen so far (a max-heap of size k)."""

    def __init__(self, k: int):
        self.k, self.heap = k, []

    def add(self, priority: int, item: str) -> None:
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, (-priority, item))
        elif -self.heap[0][0] > priority:
            heapq.heapreplace(self.heap, (-priority, item))

    def items(self) -> List[str]:
        return [item for _, item in sorted(self.heap, key=lambda e: (-e[0], e[1]))]


def fit_model(positives: Iterable[str], raw: Iterable[str], cfg: QualityConfig) -> Tuple[Model, dict]:
    """Sample (bounded, seeded), then fit the two cross-fitted classifiers; returns the model and
    the sample sizes. ``positives`` and ``raw`` are texts, streamed once."""
    pos, neg = _BottomK(cfg.max_train_docs), (_BottomK(cfg.max_train_docs), _BottomK(cfg.max_train_docs))
    seen = [0, 0, 0]
    for text in positives:
        head = text[: cfg.max_chars]
        pos.add(fold_and_priority(head, cfg)[1], head)
        seen[0] += 1
    for text in raw:
        head = text[: cfg.max_chars]
        fold, prio = fold_and_priority(head, cfg)
        neg[fold].add(prio, head)
        seen[1 + fold] += 1
    if seen[0] == 0 or seen[1] + seen[2] == 0:
        raise ValueError("the quality classifier needs curated (positive) and raw (negative) documents")
    vec = _vectorizer(cfg)
    xpos = vec.transform(pos.items())
    coef, intercept = np.zeros((2, cfg.n_features)), np.zeros(2)
    for k in (0, 1):
        other = neg[1 - k] if seen[2 - k] else neg[k]  # a fold with no documents scores nothing anyway
        clf = _fit(xpos, vec.transform(other.items()))
        coef[k], intercept[k] = clf.coef_[0], clf.intercept_[0]
    sample = {"positives": len(pos.heap), "negatives": [len(neg[0].heap), len(neg[1].heap)],
              "curated_docs": seen[0], "raw_docs": seen[1] + seen[2]}
    return {"coef": coef, "intercept": intercept}, sample


def _fit(pos, neg):
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression

    y = np.r_[np.ones(pos.shape[0]), np.zeros(neg.shape[0])]
    return LogisticRegression(solver="liblinear", class_weight="balanced").fit(sp.vstack([pos, neg]), y)


def save_model(path: Path, model: Model) -> None:
    with open(path, "wb") as f:
        np.savez(f, coef=model["coef"], intercept=model["intercept"])


def load_model(path: Path) -> Model:
    with np.load(path, allow_pickle=False) as z:
        return {"coef": z["coef"], "intercept": z["intercept"]}


def scores(texts: Sequence[str], model: Model, cfg: QualityConfig) -> np.ndarray:
    """P(curated) of each text, from the classifier of the text's fold (liblinear's predict_proba)."""
    heads = [t[: cfg.max_chars] for t in texts]
    fold = np.array([fold_and_priority(h, cfg)[0] for h in heads], dtype=np.int64)
    x = _vectorizer(cfg).transform(heads)
    z = (x @ model["coef"].T)[np.arange(len(heads)), fold] + model["intercept"][fold]
    return 1.0 / (1.0 + np.exp(-z))


def uniforms(source: str, docs: Sequence[Doc], cfg: QualityConfig) -> np.ndarray:
    """One uniform draw in (0, 1) per document, from a keyed hash of (source, id, text)."""
    h = [int.from_bytes(_digest(cfg, "pareto", source, i, t)[:8], "little") for i, t in docs]
    return (np.array(h, dtype=np.float64) + 0.5) / 2.0**64


def pareto_keep(scores: np.ndarray, alpha: float, u: np.ndarray) -> np.ndarray:
    """GPT-3's rule: keep where a Pareto(alpha) draw exceeds 1 - score. The draw is numpy's
    ``pareto`` (Lomax) by its inverse CDF of the uniform ``u``: (1 - u) ** (-1 / alpha) - 1."""
    return (1.0 - np.asarray(u)) ** (-1.0 / alpha) - 1.0 > 1.0 - np.asarray(scores)


def filter_docs(source: str, docs: Iterable[Doc], model: Model, cfg: QualityConfig, why: Counter) -> Iterator[Doc]:
    """The documents of ``source`` the rule keeps, streaming in batches; ``why`` gets the count of
    low-quality documents and ``score_sum`` (the sum of the scores, for the mean)."""
    batch: List[Doc] = []

    def flush():
        s = scores([t for _, t in batch], model, cfg)
        keep = pareto_keep(s, cfg.alpha, uniforms(source, batch, cfg))
        why["low_quality"] += int((~keep).sum())
        why["score_sum"] += float(s.sum())
        out = [d for d, k in zip(batch, keep) if k]
        batch.clear()
        return out

    for doc in docs:
        batch.append(doc)
        if len(batch) == _BATCH:
            yield from flush()
    if batch:
        yield from flush()


def quality_filter(
    curated: Dict[str, List[Doc]], to_filter: Dict[str, List[Doc]], cfg: QualityConfig
) -> Tuple[Dict[str, List[Doc]], Dict[str, Counter]]:
    """In memory: filter each source of ``to_filter`` with a classifier fitted as the stage fits it."""
    model, _ = fit_model((t for docs in curated.values() for _, t in docs), (t for docs in to_filter.values() for _, t in docs), cfg)
    out, counts = {}, {}
    for name, docs in to_filter.items():
        why: Counter = Counter()
        out[name] = list(filter_docs(name, docs, model, cfg, why))
        counts[name] = mean_score(why, len(docs))
    return out, counts


def mean_score(why: Counter, docs_in: int) -> Counter:
    """The reasons as reported: ``score_sum`` becomes ``mean_score_x1000``."""
    out = Counter({k: v for k, v in why.items() if k != "score_sum"})
    out["low_quality"] += 0
    out["mean_score_x1000"] = int(1000 * why.get("score_sum", 0.0) / docs_in) if docs_in else 0
    return out
