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
The exact keys and each band are grouped in passes of ``docs_per_pass`` documents (a hash of the
columns picks a document's pass), so a task's memory is set by configuration, not by the corpus.
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
    return _pairs_of(idx, rows[idx], source[idx], cap)


def _pairs_of(idx: np.ndarray, rows: np.ndarray, source: np.ndarray, cap: int) -> np.ndarray:
    """band_pairs of documents ``idx`` (increasing), given their rows and source keys."""
    cols = [source] + [rows[:, c] for c in range(rows.shape[1])] + [idx]
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


def _row_hash(source: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's source key and columns: equal rows, equal hashes."""
    h = source.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for c in range(rows.shape[1]):
        h = (h ^ rows[:, c].astype(np.uint64)) * np.uint64(0x100000001B3)
    return h ^ (h >> np.uint64(29))


Block = Callable[[int, int], Tuple[np.ndarray, np.ndarray]]  # (a, b) -> (source keys, rows) of documents [a, b)


def _passes(block: Block, n: int, skip, per_pass: int):
    """Documents [0, n) in passes of about ``per_pass``: each pass yields the documents not in
    ``skip`` (a mask, or None) as (indices, source keys, rows), those of one class of _row_hash,
    read ``per_pass`` at a time; equal rows fall in the same pass. Memory: a pass's and a block's
    documents, whatever ``n``."""
    passes = max(1, -(-n // max(per_pass, 1)))
    for p in range(passes):
        idx, src, rows = [], [], []
        for a in range(0, n, per_pass):
            b = min(n, a + per_pass)
            s, r = block(a, b)
            take = np.ones(b - a, dtype=bool) if skip is None else ~np.asarray(skip[a:b])
            if passes > 1:
                take &= _row_hash(s, r) % np.uint64(passes) == np.uint64(p)
            sel = np.flatnonzero(take)
            idx.append(sel + a)
            src.append(s[sel])
            rows.append(r[sel])
        if idx:
            yield np.concatenate(idx), np.concatenate(src), np.concatenate(rows)


def verified_pairs_in_passes(block: Block, n: int, skip, per_pass: int, rows_of, threshold: float,
                             cap: int = PAIR_CAP) -> np.ndarray:
    """verify(band_pairs(...)) over documents whose source keys and band columns ``block(a, b)``
    reads, except those in ``skip``, a pass of about ``per_pass`` documents at a time (the same
    pairs, in another order)."""
    out = [verify(_pairs_of(idx, rows, src, cap), rows_of, threshold) for idx, src, rows in _passes(block, n, skip, per_pass)]
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def exact_mask_in_passes(block: Block, n: int, cfg: DedupConfig, per_pass: int, out=None) -> np.ndarray:
    """exact_mask over documents whose source keys and exact keys ``block(a, b)`` reads, a pass of
    about ``per_pass`` documents at a time, into ``out`` (n zeros: in memory, or a memory-mapped
    file, tasks.array_file) or a new array; holds a pass."""
    dup = np.zeros(n, dtype=bool) if out is None else out
    if cfg.exact:
        for idx, src, keys in _passes(block, n, None, per_pass):
            dup[idx] = exact_duplicates(keys, src)  # idx is increasing: document order is kept
    return dup


def verify(pairs: np.ndarray, rows_of: Callable[[np.ndarray], np.ndarray], threshold: float) -> np.ndarray:
    """The pairs whose estimated Jaccard (share of equal signature values) reaches the threshold;
    ``rows_of(idx)`` returns the signatures of documents ``idx``."""
    keep = np.zeros(len(pairs), dtype=bool)
    for s in range(0, len(pairs), 1 << 16):  # 2 x 64k signatures at a time
        a, b = rows_of(pairs[s : s + (1 << 16), 0]), rows_of(pairs[s : s + (1 << 16), 1])
        keep[s : s + len(a)] = (a == b).mean(axis=1) >= threshold
    return pairs[keep]


def select(exact_dup: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Each document's fate (KEEP, EXACT, NEAR), in document order: a document is a near duplicate
    when a verified pair joins it to an earlier document that was kept."""
    fate = np.where(exact_dup, EXACT, KEEP).astype(np.uint8)
    _greedy(fate, pairs)
    return fate


def select_in_ranges(exact_dup: np.ndarray, pair_sets: Sequence[np.ndarray], per_range: int, out=None) -> np.ndarray:
    """select() over the pairs of several sets (each sorted by its later document: the band tasks'
    files, memory-mapped), read for ``per_range`` later documents at a time: the pairs of a range
    are held, not all of them. An earlier document's fate is final before any later one's. The
    fates go to ``out`` (uint8, as long as ``exact_dup``; e.g. memory-mapped) or a new array."""
    fate = np.zeros(len(exact_dup), dtype=np.uint8) if out is None else out
    for lo in range(0, len(fate), max(per_range, 1)):
        fate[lo : lo + per_range] = np.where(exact_dup[lo : lo + per_range], EXACT, KEEP)
    for lo in range(0, len(fate), max(per_range, 1)):
        hi = lo + per_range
        parts = [np.asarray(p[np.searchsorted(p[:, 1], lo) : np.searchsorted(p[:, 1], hi)]) for p in pair_sets if len(p)]
        if parts:
            _greedy(fate, np.concatenate(parts))
    return fate


def by_later(pairs: np.ndarray) -> np.ndarray:
    """``pairs`` sorted by later document, then earlier (select_in_ranges reads them so)."""
    return pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))] if len(pairs) else pairs


def _greedy(fate: np.ndarray, pairs: np.ndarray) -> None:
    if not len(pairs):
        return
    for i, j in by_later(np.unique(pairs, axis=0)).tolist():
        if fate[j] == KEEP and fate[i] == KEEP:
            fate[j] = NEAR


def fates(keys: np.ndarray, sigs: np.ndarray, source: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """Every step in one process, on arrays held in memory (the stage spreads them over tasks)."""
    exact = exact_mask(keys, source, cfg)
    b, r = bands(cfg)
    pairs = [verify(band_pairs(sigs[:, k * r : (k + 1) * r], source, ~exact), lambda i: sigs[i], cfg.threshold) for k in range(b)]
    return select(exact, np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64))


class ChunkArrays:
    """The signature tasks' per-chunk arrays (``keys-R.npy``, ``sig-R.npy``), memory-mapped, read
    by global document index."""

    def __init__(self, sig_dir: Path, counts: Sequence[int], chunk_sources: Sequence[int]):
        self.keys = [np.load(sig_dir / f"keys-{r:05d}.npy", mmap_mode="r") for r in range(len(counts))]
        self.sigs = [np.load(sig_dir / f"sig-{r:05d}.npy", mmap_mode="r") for r in range(len(counts))]
        self.starts = np.r_[0, np.cumsum(counts)].astype(np.int64)
        self.chunk_sources = np.asarray(chunk_sources, dtype=np.int64)
        self.n = int(self.starts[-1])

    def _range(self, maps: list, a: int, b: int, cols: slice) -> np.ndarray:
        first, last = (int(x) for x in np.searchsorted(self.starts, [a, max(a, b - 1)], side="right") - 1)
        parts = [maps[c][max(a, self.starts[c]) - self.starts[c] : min(b, self.starts[c + 1]) - self.starts[c], cols]
                 for c in range(first, last + 1)]
        return np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros((0, maps[0].shape[1]), maps[0].dtype)

    def sources(self, a: int, b: int) -> np.ndarray:
        return self.chunk_sources[np.searchsorted(self.starts, np.arange(a, b), side="right") - 1]

    def key_block(self, a: int, b: int):
        return self.sources(a, b), self._range(self.keys, a, b, slice(None))

    def band_block(self, band: int, rows: int) -> Block:
        return lambda a, b: (self.sources(a, b), self._range(self.sigs, a, b, slice(band * rows, (band + 1) * rows)))

    def rows_of(self, idx: np.ndarray) -> np.ndarray:
        """The signatures of documents ``idx``."""
        if not len(idx):
            return np.zeros((0, self.sigs[0].shape[1] if self.sigs else 0), np.uint32)
        chunk = np.searchsorted(self.starts, idx, side="right") - 1
        return np.stack([self.sigs[c][i - self.starts[c]] for c, i in zip(chunk.tolist(), idx.tolist())])


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
