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


def _head(texts, n: int) -> List[str]:
    return [t[:n] for t in texts]


def train_classifier(positives: Sequence[str], negatives: Sequence[str], cfg: QualityConfig):
    """Fit the classifier; returns a function texts -> P(curated) scores."""
    vec = _vectorizer(cfg)
    pos, neg = vec.transform(_head(positives, cfg.max_chars)), vec.transform(_head(negatives, cfg.max_chars))
    clf = _fit(pos, neg, cfg, np.random.default_rng(cfg.seed))
    return lambda texts: clf.predict_proba(vec.transform(_head(texts, cfg.max_chars)))[:, 1]


def _fit(pos, neg, cfg: QualityConfig, rng: np.random.Generator):
    """Logistic regression on at most max_train_docs sampled rows per class (sparse matrices)."""
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression

    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise ValueError("the quality classifier needs curated (positive) and raw (negative) documents")
    pick = lambda m: m[np.sort(rng.choice(m.shape[0], min(m.shape[0], cfg.max_train_docs), replace=False))]
    pos, neg = pick(pos), pick(neg)
    y = np.r_[np.ones(pos.shape[0]), np.zeros(neg.shape[0])]
    return LogisticRegression(solver="liblinear", class_weight="balanced").fit(sp.vstack([pos, neg]), y)


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
    vec = _vectorizer(cfg)
    pos = vec.transform(_head((t for docs in curated.values() for _, t in docs), cfg.max_chars))
    raw = vec.transform(_head((t for docs in to_filter.values() for _, t in docs), cfg.max_chars))
    rng = np.random.default_rng(cfg.seed)
    fold = rng.permutation(raw.shape[0]) % 2
    scores = np.zeros(raw.shape[0])
    for k in (0, 1):
        test = np.flatnonzero(fold == k)
        train = np.flatnonzero(fold != k)
        if len(test):
            clf = _fit(pos, raw[train if len(train) else test], cfg, rng)
            scores[test] = clf.predict_proba(raw[test])[:, 1]
    out, counts, start = {}, {}, 0
    for name, docs in to_filter.items():
        s = scores[start : start + len(docs)]
        start += len(docs)
        keep = pareto_keep(s, cfg.alpha, np.random.default_rng([cfg.seed, zlib.crc32(name.encode())]))
        out[name] = [d for d, k in zip(docs, keep) if k]
        counts[name] = Counter(low_quality=int((~keep).sum()))
        counts[name]["mean_score_x1000"] = int(1000 * float(np.mean(s))) if len(s) else 0
    return out, counts
