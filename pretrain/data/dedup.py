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


def deduplicate(docs_by_source: Dict[str, List[Doc]], cfg: DedupConfig, progress=None) -> Tuple[Dict[str, List[Doc]], Dict[str, Counter]]:
    """Return kept documents per source and counts of exact/fuzzy duplicates removed;
    ``progress(text)`` is called for every document as it is looked at."""
    from datasketch import MinHashLSH

    def new_index():
        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=tuple(cfg.lsh_weights))
        return set(), lsh, {}

    shared = new_index()
    out, counts = {}, {}
    for name, docs in docs_by_source.items():
        seen, lsh, sigs = shared if cfg.across_sources else new_index()
        kept, c = [], Counter()
        for doc_id, text in docs:
            if progress is not None:
                progress(text)
            if cfg.exact:
                key = _exact_key(text)
                if key in seen:
                    c["exact_duplicate"] += 1
                    continue
                seen.add(key)
            m = minhash(text, cfg)
            if any(m.jaccard(sigs[k]) >= cfg.threshold for k in lsh.query(m)):
                c["near_duplicate"] += 1
                continue
            key = f"{name}/{doc_id}/{len(sigs)}"
            lsh.insert(key, m)
            sigs[key] = m
            kept.append((doc_id, text))
        out[name], counts[name] = kept, c
    return out, counts
