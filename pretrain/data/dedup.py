"""Stage 3, deduplication: exact (normalised text hash), then fuzzy (MinHash + LSH banding).

Sources are visited in the given order (the pipeline puts curated sources first, so a raw
document that duplicates a curated one is the one removed, as in GPT-3). A document is a fuzzy
duplicate when LSH proposes a kept document whose estimated Jaccard similarity of word shingles
reaches the threshold; LSH only proposes candidates, the estimate decides (its banding is tuned
for recall, ``DedupConfig.lsh_weights``).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Dict, List, Tuple


from pretrain.data.config import DedupConfig

Doc = Tuple[str, str]
_WORD = re.compile(r"\w+")


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


def minhash(text: str, cfg: DedupConfig):
    from datasketch import MinHash

    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=_hash32)
    m.update_batch(list(shingles(text, cfg.shingle_words)))
    return m


def _exact_key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()


class Deduplicator:
    """Streaming deduplication: ``keep(source, doc)`` for each document in order (sources in the
    order wanted: curated first). Holds the exact-text hashes and the MinHash signatures of the
    documents kept so far, not their text; ``counts[source]`` says why documents were removed."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.counts: Dict[str, Counter] = {}
        self._shared = self._new_index()
        self._indexes: Dict[str, tuple] = {}

    def _new_index(self):
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=self.cfg.threshold, num_perm=self.cfg.num_perm, weights=tuple(self.cfg.lsh_weights))
        return set(), lsh, {}

    def keep(self, source: str, doc: Doc) -> bool:
        cfg, c = self.cfg, self.counts.setdefault(source, Counter())
        if cfg.across_sources:
            seen, lsh, sigs = self._shared
        else:
            if source not in self._indexes:
                self._indexes[source] = self._new_index()
            seen, lsh, sigs = self._indexes[source]
        doc_id, text = doc
        if cfg.exact:
            key = _exact_key(text)
            if key in seen:
                c["exact_duplicate"] += 1
                return False
            seen.add(key)
        m = minhash(text, cfg)
        if any(m.jaccard(sigs[k]) >= cfg.threshold for k in lsh.query(m)):
            c["near_duplicate"] += 1
            return False
        key = f"{source}/{doc_id}/{len(sigs)}"
        lsh.insert(key, m)
        sigs[key] = m
        return True


def deduplicate(docs_by_source: Dict[str, List[Doc]], cfg: DedupConfig) -> Tuple[Dict[str, List[Doc]], Dict[str, Counter]]:
    """Return kept documents per source and counts of exact/fuzzy duplicates removed."""
    dd = Deduplicator(cfg)
    out = {name: [doc for doc in docs if dd.keep(name, doc)] for name, docs in docs_by_source.items()}
    return out, {n: dd.counts.get(n, Counter()) for n in docs_by_source}
