"""The document stream of the synthetic corpus: which document comes next, and where its copies land.

Each new document is, by the rates of ``PlantConfig``, a base document or the first of a plant
(exact duplicates, a near-duplicate cluster, a contaminated document); the later members of a plant
wait in a heap until their position, up to ``max_gap`` documents on. Every document draws from its
own random stream, so a plant does not shift the documents after it.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from pretrain.data.decontam import hits, is_contaminated, roll_ngram_hashes
from pretrain.data.dedup import jaccard
from pretrain.data.synth.docs import EvalSpans, Paras, base_doc, contaminate, exact_copy, render, variant
from pretrain.data.synth.pool import Pool
from pretrain.data.synth.shards import ShardWriter, doc_id_at

DEFAULT_TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass
class PlantConfig:
    """How much is planted: each rate is the chance that a new document starts that kind of plant."""

    exact_rate: float = 0.01
    near_rate: float = 0.02
    contam_rate: float = 0.005
    cluster_rate: float = 0.3  # share of near-duplicate plants with 2-3 variants instead of 1
    targets: Tuple[float, ...] = DEFAULT_TARGETS
    doc_words: Tuple[int, int] = (250, 3000)  # log-uniform length of a base document, words
    near_min_words: int = 600  # near-duplicate bases: one word substitution moves J by < 0.02
    max_gap: Optional[int] = None  # documents between an original and its copy (None: ~ one shard)


class Planter:
    """The document stream: base documents, and plants whose copies wait in a heap for their position."""

    def __init__(self, writer: ShardWriter, rng: random.Random, pools: List[Pool], plants: PlantConfig,
                 spans: EvalSpans, eval_ngrams: np.ndarray, n: int, k: int):
        self.writer, self.rng, self.pools, self.plants, self.spans = writer, rng, pools, plants, spans
        self.eval_ngrams, self.n, self.k = eval_ngrams, n, k
        self.cum = list(np.cumsum([len(p.sentences) for p in pools]))  # corpus weights: pool sizes
        lo, hi = plants.doc_words
        avg_bytes = 6.0 * (hi - lo) / math.log(hi / lo)  # mean of the log-uniform length, ~6 bytes a word
        self.max_gap = plants.max_gap or max(20, int(writer.limit / avg_bytes))  # about one shard
        self.pending: List[tuple] = []  # heap of (position, sequence number, text, on_emit(id))
        self.pending_bytes = self.seq = self.rejected = 0
        self.targets: List[float] = []
        self.counts = {p.name: 0 for p in pools}
        self.exact: List[dict] = []
        self.near: List[dict] = []
        self.contam: List[dict] = []

    # ---- the stream ----

    def done(self, total_bytes: int) -> bool:
        """Nothing pending and the budget reached (with nothing pending, step() writes no new document then)."""
        return not self.pending and self.writer.bytes >= total_bytes

    def step(self, total_bytes: int) -> None:
        """Write one document: a copy that is due (all of them once the budget is reached), or a new one."""
        full = self.writer.bytes + self.pending_bytes >= total_bytes  # then no new document either
        if self.pending and (full or self.pending[0][0] <= self.writer.docs):
            _, _, text, on_emit = heapq.heappop(self.pending)
            self.pending_bytes -= len(text) + 40
            on_emit(self.emit(text))
            return
        r = random.Random(self.rng.getrandbits(64))  # one stream per document: plants do not shift the rest
        u, p = self.rng.random(), self.plants
        if u < p.exact_rate:
            self.plant_exact(r)
        elif u < p.exact_rate + p.near_rate:
            self.plant_near(r)
        elif u < p.exact_rate + p.near_rate + p.contam_rate:
            self.plant_contamination(r)
        else:
            pool, _, text = self.clean_doc(r)
            self.emit(text, pool.name)

    def emit(self, text: str, pool_name: Optional[str] = None) -> str:
        doc_id = doc_id_at(self.writer.docs)
        self.writer.write(doc_id, text)
        if pool_name:
            self.counts[pool_name] += 1
        return doc_id

    def later(self, text: str, on_emit) -> None:
        self.seq += 1
        heapq.heappush(self.pending, (self.writer.docs + self.rng.randint(1, self.max_gap), self.seq, text, on_emit))
        self.pending_bytes += len(text) + 40

    # ---- documents and plants ----

    def clean_doc(self, r: random.Random, min_words: int = 0) -> Tuple[Pool, Paras, str]:
        lo, hi = self.plants.doc_words
        while True:
            pool = self.pools[bisect.bisect_right(self.cum, r.randrange(self.cum[-1]))]
            paras, order = base_doc(r, pool, int(math.exp(r.uniform(math.log(max(min_words, lo)), math.log(hi)))))
            # Pool sentences hold no evaluation n-gram; this catches one across sentence boundaries.
            grams = roll_ngram_hashes(pool.word_hashes_of(order), self.n)
            if not hits(grams, self.eval_ngrams).any():
                return pool, paras, render(paras)
            self.rejected += 1

    def plant_exact(self, r: random.Random) -> None:
        pool, _, text = self.clean_doc(r)
        entry = dict(original=self.emit(text, pool.name), copies=[])
        self.exact.append(entry)
        for _ in range(1 if r.random() < 0.7 else r.randint(2, 3)):
            copy, kind = exact_copy(r, text)
            self.later(copy, lambda i, kind=kind: entry["copies"].append(dict(id=i, variation=kind)))

    def plant_near(self, r: random.Random) -> None:
        pool, paras, text = self.clean_doc(r, self.plants.near_min_words)
        cluster = dict(base=self.emit(text, pool.name), variants=[], pairs=[])
        self.near.append(cluster)
        texts = [text]
        for _ in range(1 if r.random() >= self.plants.cluster_rate else r.randint(2, 3)):
            if not self.targets:  # every target in turn, in a shuffled order
                self.targets.extend(self.rng.sample(self.plants.targets, len(self.plants.targets)))
            target = self.targets.pop()
            v = render(variant(r, paras, pool, target, self.k))
            if is_contaminated(v, self.eval_ngrams, self.n):
                continue
            texts.append(v)
            var = dict(id=None, target=target)
            cluster["variants"].append(var)
            self.later(v, lambda i, var=var: var.update(id=i))
        # Measured now, while the texts are at hand; the ids of a and b are filled in at the end.
        cluster["pairs"] = [
            dict(a=a, b=b, target=cluster["variants"][b - 1]["target"] if a == 0 else None, jaccard=round(jaccard(texts[a], texts[b], self.k), 6))
            for a in range(len(texts)) for b in range(a + 1, len(texts))
        ]

    def plant_contamination(self, r: random.Random) -> None:
        pool, paras, _ = self.clean_doc(r)
        planted = [self.spans.sample(r) for _ in range(1 if r.random() < 0.7 else r.randint(2, 3))]
        self.contam.append(dict(id=self.emit(render(contaminate(r, paras, planted)), pool.name), spans=planted))
