"""Stage 2, quality filtering as in GPT-3: a logistic regression on hashed n-gram features.

Positives are the curated sources' documents, negatives the documents of the sources being
filtered (the "raw" ones). A filtered document is kept when ``pareto(alpha) > 1 - score``
(alpha = 9), so low-scoring documents still survive now and then, as GPT-3 intended.
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Dict, List, Sequence, Tuple

import numpy as np

from pretrain.data.config import QualityConfig

Doc = Tuple[str, str]


def _vectorizer(cfg: QualityConfig):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        n_features=cfg.n_features, ngram_range=(1, cfg.ngram_max), alternate_sign=False, norm="l2", lowercase=True
    )


def _sample(texts: List[str], n: int, rng: np.random.Generator) -> List[str]:
    if len(texts) <= n:
        return texts
    return [texts[i] for i in sorted(rng.choice(len(texts), n, replace=False))]


def train_classifier(positives: Sequence[str], negatives: Sequence[str], cfg: QualityConfig):
    """Fit the classifier; returns a function texts -> P(curated) scores."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(cfg.seed)
    pos = _sample(list(positives), cfg.max_train_docs, rng)
    neg = _sample(list(negatives), cfg.max_train_docs, rng)
    if not pos or not neg:
        raise ValueError("the quality classifier needs curated (positive) and raw (negative) documents")
    vec = _vectorizer(cfg)
    x = vec.transform(pos + neg)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    clf = LogisticRegression(max_iter=1000, class_weight="balanced").fit(x, y)
    return lambda texts: clf.predict_proba(vec.transform(list(texts)))[:, 1]


def pareto_keep(scores: np.ndarray, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """GPT-3's rule: keep where a Pareto(alpha) draw exceeds 1 - score."""
    return rng.pareto(alpha, size=len(scores)) > 1.0 - np.asarray(scores)


def quality_filter(
    curated: Dict[str, List[Doc]], to_filter: Dict[str, List[Doc]], cfg: QualityConfig
) -> Tuple[Dict[str, List[Doc]], Dict[str, Counter]]:
    """Filter each source of ``to_filter``; seeded, so the same input keeps the same documents.

    Scores are cross-fitted: the raw documents are split in two folds and each fold is scored
    by a classifier trained on the curated documents and the other fold, so no document is
    scored by a model that saw it as a negative.
    """
    positives = [t for docs in curated.values() for _, t in docs]
    raw = [t for docs in to_filter.values() for _, t in docs]
    fold = np.random.default_rng(cfg.seed).permutation(len(raw)) % 2
    scores = np.zeros(len(raw))
    for k in (0, 1):
        train = [t for t, f in zip(raw, fold) if f != k] or raw
        test = np.flatnonzero(fold == k)
        if len(test):
            scores[test] = train_classifier(positives, train, cfg)([raw[i] for i in test])
    out, counts, start = {}, {}, 0
    for name, docs in to_filter.items():
        s = scores[start : start + len(docs)]
        start += len(docs)
        rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
        keep = pareto_keep(s, cfg.alpha, rng)
        out[name] = [d for d, k in zip(docs, keep) if k]
        counts[name] = Counter(low_quality=int((~keep).sum()))
        counts[name]["mean_score_x1000"] = int(1000 * float(np.mean(s))) if len(s) else 0
    return out, counts
