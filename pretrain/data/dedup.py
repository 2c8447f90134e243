"""Stage 3, deduplication: exact (normalised text hash), then fuzzy (MinHash + LSH banding).

Sources are visited in the given order (the pipeline puts curated sources first, so a raw
document that duplicates a curated one is the one removed, as in GPT-3). A document is a fuzzy
duplicate when LSH proposes an earlier *kept* document whose estimated Jaccard similarity of word
shingles reaches the threshold; LSH only proposes candidates, the estimate decides (its banding is
tuned for recall, ``DedupConfig.lsh_weights``).

On arrays, in steps that each hold little: signatures (``uint32 [n, num_perm]``, one row per
document, written to disk by one task per chunk), candidate pairs per LSH band (rows with equal band
columns, verified by their estimated Jaccard), and the greedy pass in document order over the
verified pairs (``select``), which keeps the rule above exactly. A bucket's document is compared
with at most ``PAIR_CAP`` earlier documents of that bucket, which bounds the pairs of a huge cluster.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import numpy as np

from pretrain.data.config import DedupConfig

Doc = Tuple[str, str]
_WORD = re.compile(r"\w+")
PAIR_CAP = 64
KEEP, EXACT, NEAR = 0, 1, 2
REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate"}


def shingles(text: str, k: int) -> set:
    words = _WORD.findall(text.lower())
    if len(words) < k:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + k]).encode() for i in range(len(words) - k + 1)}


def jaccard(a: str, b: str, k: int) -> float:
    sa, sb = shingles(a, k), shingles(b, k)
    return len(sa & sb) / max(len(sa | sb), 1)


def _hash32(b: bytes) -> int:
    import xxhash

    return xxhash.xxh32_intdigest(b)


def minhash(text: str, cfg: DedupConfig, like=None):
    """The text's MinHash; ``like`` (a MinHash of the same config) lends its permutations."""
    from datasketch import MinHash

    extra = {"permutations": like.permutations, "scheme": like.scheme} if like is not None else {}
    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=_hash32, **extra)
    m.update_batch(list(shingles(text, cfg.shingle_words)))
    return m


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()


def bands(cfg: DedupConfig) -> Tuple[int, int]:
    """(bands, rows per band) of the LSH, as datasketch's MinHashLSH picks them."""
    from datasketch.lsh import _optimal_param

    fp, fn = cfg.lsh_weights
    return _optimal_param(cfg.threshold, cfg.num_perm, fp, fn)


def signatures(texts: Iterable[str], cfg: DedupConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Exact keys (``uint64 [n, 2]``) and MinHash signatures (``uint32 [n, num_perm]``)."""
    like = minhash("", cfg)
    keys, sigs = [], []
    for text in texts:
        keys.append(np.frombuffer(exact_key(text), dtype=np.uint64))
        sigs.append(minhash(text, cfg, like).hashvalues.astype(np.uint32))
    if not keys:
        return np.zeros((0, 2), np.uint64), np.zeros((0, cfg.num_perm), np.uint32)
    return np.stack(keys), np.stack(sigs)


def _groups(columns: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Rows sorted by ``columns`` (the last is the document index, so ties keep document order),
    and the start of each run of rows equal in every column but the last."""
    order = np.lexsort(columns[::-1])
    key = [c[order] for c in columns[:-1]]
    new = np.ones(len(order), dtype=bool)
    if len(order):
        new[1:] = np.any([k[1:] != k[:-1] for k in key], axis=0)
    return order, np.flatnonzero(new)


def exact_duplicates(keys: np.ndarray, source: np.ndarray) -> np.ndarray:
    """True where an earlier document (of the same source, if ``source`` differs) has the same key."""
    n = len(keys)
    order, starts = _groups([source, keys[:, 0], keys[:, 1], np.arange(n)])
    dup = np.ones(n, dtype=bool)
    dup[order[starts]] = False
    return dup


def exact_mask(keys: np.ndarray, source: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """Where exact deduplication removes a document (nowhere when ``cfg.exact`` is off)."""
    return exact_duplicates(keys, source) if cfg.exact else np.zeros(len(keys), dtype=bool)


def band_pairs(rows: np.ndarray, source: np.ndarray, eligible: np.ndarray, cap: int = PAIR_CAP) -> np.ndarray:
    """Pairs (i, j), i < j, of eligible documents with equal ``rows`` (one band's signature
    columns) and source key; each document paired with at most ``cap`` earlier ones."""
    idx = np.flatnonzero(eligible)
    cols = [source[idx]] + [rows[idx, c] for c in range(rows.shape[1])] + [idx]
    order, starts = _groups(cols)
    ends = np.r_[starts[1:], len(order)]
    big = ends - starts >= 2
    out = []
    for s, e in zip(starts[big].tolist(), ends[big].tolist()):
        g = idx[order[s:e]]
        for c in range(1, len(g)):
            for a in range(min(c, cap)):
                out.append((g[a], g[c]))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def verify(pairs: np.ndarray, rows_of: Callable[[np.ndarray], np.ndarray], threshold: float) -> np.ndarray:
    """The pairs whose estimated Jaccard (share of equal signature values) reaches the threshold;
    ``rows_of(idx)`` returns the signatures of documents ``idx``."""
    if not len(pairs):
        return pairs
    a, b = rows_of(pairs[:, 0]), rows_of(pairs[:, 1])
    return pairs[(a == b).mean(axis=1) >= threshold]


def select(exact_dup: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Each document's fate (KEEP, EXACT, NEAR), in document order: a document is a near duplicate
    when a verified pair joins it to an earlier document that was kept."""
    fate = np.where(exact_dup, EXACT, KEEP).astype(np.uint8)
    if not len(pairs):
        return fate
    pairs = np.unique(pairs, axis=0)
    pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]  # by later document, then earlier
    for i, j in pairs.tolist():
        if fate[j] == KEEP and fate[i] == KEEP:
            fate[j] = NEAR
    return fate


def fates(keys: np.ndarray, sigs: np.ndarray, source: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """Every step in one process, on arrays held in memory (the stage spreads them over tasks)."""
    exact = exact_mask(keys, source, cfg)
    b, r = bands(cfg)
    pairs = [verify(band_pairs(sigs[:, k * r : (k + 1) * r], source, ~exact), lambda i: sigs[i], cfg.threshold) for k in range(b)]
    return select(exact, np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64))


def doc_sources(counts: Sequence[int], chunk_sources: Sequence[int]) -> np.ndarray:
    """Each document's source key, from its chunk's (``counts[R]`` documents in chunk R)."""
    return np.repeat(np.asarray(chunk_sources, dtype=np.int64), counts)


def load_keys(sig_dir: Path, chunks: int) -> np.ndarray:
    """Every document's exact key, in document order, from the signature tasks' ``keys-R.npy``."""
    return np.concatenate([np.load(sig_dir / f"keys-{r:05d}.npy") for r in range(chunks)])


def load_signatures(sig_dir: Path, counts: Sequence[int], num_perm: int):
    """The signature tasks' ``sig-R.npy`` memory-mapped (one per chunk R), and ``rows_of(idx)``,
    the signatures of documents ``idx`` (global indices, in document order)."""
    maps = [np.load(sig_dir / f"sig-{r:05d}.npy", mmap_mode="r") for r in range(len(counts))]
    starts = np.r_[0, np.cumsum(counts)]

    def rows_of(idx: np.ndarray) -> np.ndarray:
        if not len(idx):
            return np.zeros((0, num_perm), np.uint32)
        chunk = np.searchsorted(starts, idx, side="right") - 1
        return np.stack([maps[c][i - starts[c]] for c, i in zip(chunk.tolist(), idx.tolist())])

    return maps, rows_of


def source_keys(names: Sequence[str], cfg: DedupConfig) -> Dict[str, int]:
    """The key that keeps sources apart (all 0 when deduplicating across sources)."""
    return {n: 0 if cfg.across_sources else i for i, n in enumerate(names)}


def deduplicate(docs_by_source: Dict[str, List[Doc]], cfg: DedupConfig) -> Tuple[Dict[str, List[Doc]], Dict[str, Counter]]:
    """In memory: kept documents per source and counts of exact/fuzzy duplicates removed."""
    names = list(docs_by_source)
    skey = source_keys(names, cfg)
    keys, sigs = signatures((t for n in names for _, t in docs_by_source[n]), cfg)
    source = np.array([skey[n] for n in names for _ in docs_by_source[n]], dtype=np.int64)
    fate, start, out, counts = fates(keys, sigs, source, cfg), 0, {}, {}
    for n in names:
        f = fate[start : start + len(docs_by_source[n])]
        start += len(f)
        out[n] = [d for d, k in zip(docs_by_source[n], f) if k == KEEP]
        counts[n] = Counter({REASONS[k]: int((f == k).sum()) for k in (EXACT, NEAR) if (f == k).any()})
    return out, counts
