"""Quality filter, deduplication and decontamination on small hand-made cases."""

import random
from collections import Counter

import numpy as np

from pretrain.data.config import DecontamConfig, DedupConfig, QualityConfig
from pretrain.data.decontam import decontaminate, decontaminate_document, ngrams_of
from pretrain.data.dedup import (EXACT, KEEP, NEAR, ChunkArrays, band_pairs, bands, by_later, deduplicate, exact_mask_in_passes, fates,
                                 jaccard, select, select_in_ranges, signatures, verified_pairs_in_passes)
from pretrain.data.quality import filter_docs, fit_model, load_model, pareto_keep, quality_filter, save_model, uniforms
from pretrain.data.tasks import array_file

from data_synth import WORDS, make_doc

# ---- quality ---------------------------------------------------------------------------------------


def test_pareto_rule_matches_gpt3():
    n = 400_000
    # The stage's own draws: one uniform per document from a keyed hash of (source, id, text).
    u = uniforms("crawl", [(str(i), "same text") for i in range(n)], QualityConfig(seed=5))
    for score in (0.0, 0.5, 0.9, 1.0):
        kept = pareto_keep(np.full(n, score), 9.0, u).mean()
        # P(pareto(a) > t) = (1 + t) ** -a, here t = 1 - score: 1/512 = 0.00195 at score 0. The
        # kept fraction of n draws is binomial: allow 5 standard errors (relative: 18% at score 0,
        # 5% at 0.5, 0.9% at 0.9; exact at 1.0), so alpha 8 or 10 (x2 or /2 at score 0) fails.
        p = (2.0 - score) ** -9.0
        tol = 5 * np.sqrt(p * (1 - p) / n)
        assert abs(kept - p) <= tol, (score, kept, p, tol)
        assert tol <= 0.2 * p


def test_quality_filter_prefers_curated_like_documents():
    rng = random.Random(1)
    # A crawl is mostly junk with some curated-like pages: those are the ones the rule keeps.
    curated = {"books": [(str(i), make_doc(i, rng)) for i in range(300)]}
    good = [(f"g{i}", make_doc(1000 + i, rng)) for i in range(60)]
    junk = [(f"j{i}", " ".join(f"click{rng.randint(0, 50)} buy now best deal {rng.random():.3f}" for _ in range(20))) for i in range(140)]
    cfg = QualityConfig(seed=3)
    kept, counts = quality_filter(curated, {"crawl": good + junk}, cfg)
    ids = {d for d, _ in kept["crawl"]}
    good_kept = sum(d.startswith("g") for d in ids)
    junk_kept = sum(d.startswith("j") for d in ids)
    assert good_kept >= 8 and junk_kept <= 2, (good_kept, junk_kept)  # expected ~20 and ~0
    assert counts["crawl"]["low_quality"] == 200 - len(ids)
    again, _ = quality_filter(curated, {"crawl": good + junk}, cfg)
    assert again == kept  # seeded


def test_pareto_draw_is_numpys_pareto():
    u = np.random.default_rng(3).random(1000)
    # numpy's pareto(a) is exp(E / a) - 1 with E = -log(1 - U) exponential
    lomax = np.exp(-np.log1p(-u) / 9.0) - 1.0
    t = np.linspace(0, 1, 1000)
    assert (pareto_keep(1.0 - t, 9.0, u) == (lomax > t)).all()


def _quality_case(seed=1):
    rng = random.Random(seed)
    curated = [(str(i), make_doc(i, rng)) for i in range(300)]
    crawl = [(f"g{i}", make_doc(1000 + i, rng)) for i in range(60)]
    crawl += [(f"j{i}", " ".join(f"click{rng.randint(0, 50)} buy now best deal {rng.random():.3f}" for _ in range(20))) for i in range(140)]
    return curated, crawl


def test_quality_sample_is_bounded_and_order_free(tmp_path):
    curated, crawl = _quality_case()
    cfg = QualityConfig(seed=3, max_train_docs=50)
    model, sample = fit_model((t for _, t in curated), (t for _, t in crawl), cfg)
    assert sample["positives"] == 50 and sum(sample["negatives"]) == 100, sample
    assert sample["curated_docs"] == 300 and sample["raw_docs"] == 200
    # The same documents in another order (another cut into files): the same sample, the same model.
    again, _ = fit_model((t for _, t in curated[::-1]), (t for _, t in crawl[::-1]), cfg)
    assert np.array_equal(model["coef"], again["coef"]) and np.array_equal(model["intercept"], again["intercept"])
    # The model file is plain arrays: it loads with pickles refused.
    save_model(tmp_path / "model.npz", model)
    loaded = load_model(tmp_path / "model.npz")
    assert np.array_equal(loaded["coef"], model["coef"])
    # Filtering in two pieces (two tasks) keeps what filtering in one keeps.
    whole = list(filter_docs("crawl", crawl, model, cfg, Counter()))
    halves = list(filter_docs("crawl", crawl[:77], model, cfg, Counter())) + list(filter_docs("crawl", crawl[77:], model, cfg, Counter()))
    assert whole == halves and 0 < len(whole) < len(crawl)


# ---- dedup -----------------------------------------------------------------------------------------


def _variant(text: str, n_changes: int, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split()
    for i in rng.sample(range(len(words)), n_changes):
        words[i] = f"changed{i}"
    return " ".join(words)


def test_near_duplicates_above_threshold_removed_below_kept():
    rng = random.Random(2)
    base = " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(400))
    near = _variant(base, 2, 0)  # a couple of edits: Jaccard ~0.95
    far = _variant(base, 60, 1)  # many edits: Jaccard well below 0.8
    cfg = DedupConfig(threshold=0.8)
    assert jaccard(base, near, cfg.shingle_words) > 0.9
    assert jaccard(base, far, cfg.shingle_words) < 0.6
    kept, counts = deduplicate({"s": [("base", base), ("near", near), ("far", far)]}, cfg)
    assert [d for d, _ in kept["s"]] == ["base", "far"]
    assert counts["s"]["near_duplicate"] == 1


def test_exact_duplicates_and_across_sources_curated_first():
    rng = random.Random(3)
    a, b = make_doc(1, rng), make_doc(2, rng)
    docs = {"curated": [("a", a)], "raw": [("a-copy", "  " + a.upper() + " "), ("b", b)]}
    kept, counts = deduplicate(docs, DedupConfig())
    assert [d for d, _ in kept["raw"]] == ["b"] and counts["raw"]["exact_duplicate"] == 1
    kept, _ = deduplicate(docs, DedupConfig(across_sources=False))
    assert len(kept["raw"]) == 2


def _brute_force_fates(keys, sigs, cfg):
    """The rule spelled out over every pair: exact repeats go; then, in order, a document goes
    when an earlier kept one shares an LSH band with it and its estimated Jaccard reaches the threshold."""
    b, r = bands(cfg)
    fate = []
    for j in range(len(keys)):
        if any((keys[i] == keys[j]).all() for i in range(j)):
            fate.append(EXACT)
            continue
        near = any(fate[i] == KEEP and any((sigs[i, k * r:(k + 1) * r] == sigs[j, k * r:(k + 1) * r]).all() for k in range(b))
                   and (sigs[i] == sigs[j]).mean() >= cfg.threshold for i in range(j))
        fate.append(NEAR if near else KEEP)
    return np.array(fate)


def test_dedup_steps_match_the_rule_over_every_pair():
    rng = random.Random(7)
    texts = []
    for c in range(12):  # clusters of variants at similarities around the threshold, and chains
        base = " ".join(rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(300))
        texts.append(base)
        prev = base
        for v in range(4):
            prev = _variant(prev if c % 2 else base, rng.choice([3, 8, 15]), 100 * c + v)
            texts.append(prev)
        texts.append(base.upper())  # an exact repeat (case and spaces ignored)
    rng.shuffle(texts)
    cfg = DedupConfig()
    keys, sigs = signatures(texts, cfg)
    want = _brute_force_fates(keys, sigs, cfg)
    got = fates(keys, sigs, np.zeros(len(texts), dtype=np.int64), cfg)
    assert (got == want).all(), (got, want)
    assert (want == EXACT).sum() == 12 and 0 < (want == NEAR).sum() < len(texts) - 24, want


def _clustered_texts(seed: int) -> list:
    rng = random.Random(seed)
    texts = []
    for c in range(10):
        base = " ".join(rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(200))
        texts += [base, base.upper()] + [_variant(base, rng.choice([3, 8, 15]), 100 * c + v) for v in range(4)]
    rng.shuffle(texts)
    return texts


def test_dedup_in_passes_over_chunk_files_equals_in_memory(tmp_path):
    """The stage's path: per-chunk key and signature files, exact keys and each band grouped in
    passes of docs_per_pass documents (one pass, several, one document each), then the greedy
    pass; the fates are those of the in-memory steps, within and across two sources."""
    texts = _clustered_texts(11)
    cfg = DedupConfig()
    keys, sigs = signatures(texts, cfg)
    cuts = [0, 7, 8, 30, 31, len(texts)]  # chunks of every size, one of a single document
    counts = [b - a for a, b in zip(cuts, cuts[1:])]
    chunk_sources = [0, 0, 1, 1, 1]
    for r, (a, b) in enumerate(zip(cuts, cuts[1:])):
        np.save(tmp_path / f"keys-{r:05d}.npy", keys[a:b])
        np.save(tmp_path / f"sig-{r:05d}.npy", sigs[a:b])
    removed = {}
    for across in (True, False):
        cfg = DedupConfig(across_sources=across)
        source = np.repeat([0, 0, 1, 1, 1] if not across else [0] * 5, counts).astype(np.int64)
        want = fates(keys, sigs, source, cfg)
        arrays = ChunkArrays(tmp_path, counts, chunk_sources if not across else [0] * 5)
        nb, r = bands(cfg)
        for per_pass in (1000, 7, 1):
            exact = exact_mask_in_passes(arrays.key_block, arrays.n, cfg, per_pass)
            pairs = [verified_pairs_in_passes(arrays.band_block(k, r), arrays.n, exact, per_pass, arrays.rows_of, cfg.threshold)
                     for k in range(nb)]
            assert (select(exact, np.concatenate(pairs)) == want).all(), (across, per_pass)
            sorted_pairs = [by_later(p) for p in pairs]
            for per_range in (1000, 5, 1):  # the greedy pass a range of later documents at a time
                assert (select_in_ranges(exact, sorted_pairs, per_range) == want).all(), (across, per_pass, per_range)
            # As the stage runs it: the mask and the fates in memory-mapped files.
            with array_file(tmp_path / "exact.npy", arrays.n, bool) as out:
                exact_mask_in_passes(arrays.key_block, arrays.n, cfg, per_pass, out)
            mapped = np.load(tmp_path / "exact.npy", mmap_mode="r")
            assert (mapped == exact).all() and mapped.any()
            with array_file(tmp_path / "fate.npy", arrays.n, np.uint8) as out:
                select_in_ranges(mapped, sorted_pairs, 5, out)
            assert (np.load(tmp_path / "fate.npy") == want).all(), (across, per_pass)
        removed[across] = ((want == EXACT).sum(), (want == NEAR).sum())
    assert removed[True][0] >= 10 and removed[True][1] >= 4, removed
    assert sum(removed[False]) < sum(removed[True]), removed  # the source keys kept sources apart


def test_chains_keep_what_is_not_like_a_kept_document():
    """A ~ B and B ~ C but A !~ C: B goes and C stays (greedy against kept documents, not clusters)."""
    s = np.zeros((3, 128), dtype=np.uint32)
    s[1, :20] = 1  # B shares 108 of A's values (0.84), C 88 (0.69) with A and 108 with B
    s[2, :40] = 1
    keys = np.arange(6, dtype=np.uint64).reshape(3, 2)
    assert fates(keys, s, np.zeros(3, dtype=np.int64), DedupConfig()).tolist() == [KEEP, NEAR, KEEP]
    # Read a document at a time, the greedy pass must still settle A and B before C.
    pairs = [by_later(np.array([[0, 1], [1, 2]]))]
    assert select_in_ranges(np.zeros(3, dtype=bool), pairs, 1).tolist() == [KEEP, NEAR, KEEP]


def test_pairs_per_bucket_are_capped():
    rows = np.zeros((200, 8), dtype=np.uint32)  # one bucket of 200 documents
    pairs = band_pairs(rows, np.zeros(200, dtype=np.int64), np.ones(200, dtype=bool), cap=5)
    assert len(pairs) == sum(min(c, 5) for c in range(200)) and (pairs[:, 0] < pairs[:, 1]).all()
    assert pairs[:, 0].max() == 4


# ---- decontamination -------------------------------------------------------------------------------

EVAL = "the quick brown fox jumps over the lazy dog while seven wizards quietly box the jumping frogs"


def _filler(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def test_planted_13gram_is_cut_with_its_window():
    grams = ngrams_of(EVAL, 13)
    left, right = _filler(150, 1), _filler(150, 2)
    planted = "The Quick, brown fox jumps over the lazy dog while seven wizards quietly box"  # 13 words
    doc = f"{left} {planted} {right}"
    pieces, cuts = decontaminate_document(doc, grams, DecontamConfig())
    assert cuts == 1 and len(pieces) == 2
    start, end = doc.index(planted), doc.index(planted) + len(planted)
    assert pieces[0] == doc[: start - 200].strip()
    assert pieces[1] == doc[end + 200 :].strip()
    assert "wizards" not in " ".join(pieces)


def test_document_with_11_hits_dropped_10_kept():
    grams = ngrams_of(EVAL, 13)
    hit = "quick brown fox jumps over the lazy dog while seven wizards quietly box"
    def doc_with(k):
        return " ".join(f"{_filler(80, i)} {hit}" for i in range(k)) + " " + _filler(80, 99)
    pieces, cuts = decontaminate_document(doc_with(10), grams, DecontamConfig())
    assert cuts == 10 and pieces
    pieces, cuts = decontaminate_document(doc_with(11), grams, DecontamConfig())
    assert cuts == 11 and pieces == []
    out, c = decontaminate([("d", doc_with(11)), ("clean", _filler(100, 5))], grams, DecontamConfig())
    assert [d for d, _ in out] == ["clean"] and c["dropped_docs"] == 1


def test_short_fragments_dropped():
    grams = ngrams_of(EVAL, 13)
    doc = f"{_filler(10, 1)} {EVAL} {_filler(200, 2)}"
    pieces, cuts = decontaminate_document(doc, grams, DecontamConfig())
    assert cuts == 1 and len(pieces) == 1 and len(pieces[0]) >= 200


def _spread_variant(text: str, n_changes: int, seed: int) -> str:
    """``n_changes`` words replaced at least 5 words apart: each replacement removes 5 shingles."""
    rng = random.Random(seed)
    words = text.split()
    slots = rng.sample(range(len(words) // 5), n_changes)
    for s in slots:
        words[5 * s + 2] = f"changed{s}x{seed}"
    return " ".join(words)


def test_lsh_banding_finds_duplicates_just_above_the_threshold():
    """At Jaccard 0.84-0.86 (threshold 0.8) LSH must propose nearly every pair: the default banding
    (16 bands of 8 rows) proposes 99% of them, the estimate then keeps ~94% above 0.8; datasketch's
    default weights (9 bands of 13) would propose only ~69%."""
    rng = random.Random(5)
    docs, pairs = [], 40
    for i in range(pairs):
        base = " ".join(rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(400))
        near = _spread_variant(base, 6 + i % 2, i)
        assert 0.83 < jaccard(base, near, 5) < 0.87
        docs += [(f"b{i}", base), (f"n{i}", near)]
    removed = {}
    for name, weights in (("tuned", DedupConfig().lsh_weights), ("even", [0.5, 0.5])):
        _, counts = deduplicate({"s": docs}, DedupConfig(lsh_weights=weights))
        removed[name] = counts["s"]["near_duplicate"]
    assert removed["tuned"] >= 0.85 * pairs, removed
    assert removed["even"] < removed["tuned"], removed
