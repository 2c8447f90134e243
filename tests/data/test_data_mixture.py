"""Mixture weights, the GPT-3 Table 2.2 report, and sampling through megatron-core datasets."""

from collections import Counter
from types import SimpleNamespace as S

import numpy as np
import pytest
from tokenizers import Tokenizer

from pretrain.data import DataConfigError, build_datasets, build_eval_datasets
from pretrain.data.mixture import mixture_report, resolve_weights

# ---- weights and report ---------------------------------------------------------------------------


def test_gpt3_table_2_2_epochs():
    """GPT-3's weights over its source sizes give the paper's epochs at 300B tokens."""
    B = 10**9
    sizes = {"common_crawl": 410 * B, "webtext2": 19 * B, "books1": 12 * B, "books2": 55 * B, "wikipedia": 3 * B}
    weights = {"common_crawl": 0.60, "webtext2": 0.22, "books1": 0.08, "books2": 0.08, "wikipedia": 0.03}
    sources = [S(name=n, weight=w, epochs=None) for n, w in weights.items()]
    rep = mixture_report(sources, sizes, "1,0,0", 300 * B, max_epochs=3.0)
    epochs = {r["source"]: r["epochs"] for r in rep["sources"]}
    # epochs = weight * budget / tokens, with the paper's weights (summing to 1.01) normalised.
    assert epochs == pytest.approx({n: w / 1.01 * 300 * B / sizes[n] for n, w in weights.items()})
    # The paper's column: 0.44, 2.9, 1.9, 0.43, 3.4. Its WebText2/Wikipedia entries do not follow
    # from its own token counts (0.22 * 300 / 19 = 3.5); the other three agree to 0.05.
    for name, paper in {"common_crawl": 0.44, "books1": 1.9, "books2": 0.43}.items():
        assert abs(epochs[name] - paper) < 0.05 * max(1, paper)
    flagged = {r["source"] for r in rep["sources"] if r["repeated"]}
    assert flagged == {"webtext2"}


def test_weights_from_epochs_and_natural_mix():
    tokens = {"a": 1000, "b": 3000}
    nat = resolve_weights([S(name="a", weight=None, epochs=None), S(name="b", weight=None, epochs=None)], tokens, 4000)
    assert nat == pytest.approx({"a": 0.25, "b": 0.75})
    mixed = resolve_weights([S(name="a", weight=None, epochs=2.0), S(name="b", weight=1.0, epochs=None)], tokens, 4000)
    assert mixed == pytest.approx({"a": 0.5, "b": 0.5})  # 2 epochs of 1000 = half of 4000
    with pytest.raises(DataConfigError, match="epochs asked for take"):
        resolve_weights([S(name="a", weight=None, epochs=5.0), S(name="b", weight=1.0, epochs=None)], tokens, 4000)


# ---- sampling -------------------------------------------------------------------------------------

SEQ = 32


@pytest.fixture(scope="module")
def train_stream(prepared_synth):
    cfg, p = prepared_synth
    from omegaconf import OmegaConf

    n = 6000
    train, valid, test = build_datasets(p, OmegaConf.create(cfg), SEQ, (n, 40, 40), seed=7)
    return cfg, p, train, valid, test, n


def test_shapes_labels_and_no_padding(train_stream):
    _, p, train, valid, test, _ = train_stream
    for ds in (train, valid, test):
        s = ds[0]
        assert s["tokens"].shape == (SEQ,) and s["labels"].shape == (SEQ,)
        assert s["tokens"].dtype == s["labels"].dtype == np.int64 or str(s["tokens"].dtype) == "torch.int64"
    for i in range(0, 500, 7):
        s = train[i]
        assert (s["tokens"][1:] == s["labels"][:-1]).all()
        assert (s["tokens"] >= 0).all() and (s["tokens"] < p.vocab_size).all()
        assert float(s["loss_mask"].min()) == 1.0  # nothing padded or masked


def test_source_shares_within_one_percent(train_stream):
    _, p, train, _, _, n = train_stream
    counts = Counter(int(train[i]["dataset_id"]) for i in range(n))
    for k, (name, _, w) in enumerate(p.sources):
        assert abs(counts[k] * SEQ / (n * SEQ) - w) < 0.01, (name, counts[k] / n, w)


def _doc_heads(p, cfg, name):
    """The first 6 token ids of each training document of a source (unique by construction)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(dict((n, pre) for n, pre, _ in p.sources)[name])
    return [tuple(ds[i][:6].tolist()) for i in range(len(ds))]


def _count_heads(samples, heads):
    found = Counter()
    hs = set(heads)
    for toks in samples:
        t = toks.tolist()
        for j in range(len(t) - 5):
            if tuple(t[j : j + 6]) in hs:
                found[tuple(t[j : j + 6])] += 1
    return found


def test_no_document_repeats_within_an_epoch(train_stream):
    cfg, p, train, _, _, _ = train_stream
    for k, (name, _, _) in enumerate(p.sources):
        src = train.datasets[k]
        per_epoch = src.samples_per_epoch
        assert len(src) > 2 * per_epoch  # the run covers several epochs of every source
        heads = _doc_heads(p, cfg, name)
        for epoch in range(2):
            found = _count_heads((src[i]["tokens"] for i in range(epoch * per_epoch, (epoch + 1) * per_epoch)), heads)
            assert found and max(found.values()) == 1, name
            assert len(found) > 0.5 * len(heads) * 0.8  # most training documents seen once


def test_same_seed_same_order_and_resume(prepared_synth, train_stream):
    cfg, p, train, *_ = train_stream
    from omegaconf import OmegaConf

    again, _, _ = build_datasets(p, OmegaConf.create(cfg), SEQ, (6000, 40, 40), seed=7)
    other, _, _ = build_datasets(p, OmegaConf.create(cfg), SEQ, (6000, 40, 40), seed=8)
    idx = list(range(0, 6000, 37))
    assert all((train[i]["tokens"] == again[i]["tokens"]).all() for i in idx)
    assert not all((train[i]["tokens"] == other[i]["tokens"]).all() for i in idx[:50])
    # Resuming from a consumed-sample count c: a fresh build continues with sample c.
    consumed = 2345
    assert all((train[consumed + j]["tokens"] == again[consumed + j]["tokens"]).all() for j in range(50))


def test_valid_test_disjoint_from_train_and_per_source(train_stream):
    cfg, p, train, valid, test, _ = train_stream
    from omegaconf import OmegaConf

    per_source = build_eval_datasets(p, OmegaConf.create(cfg), SEQ, seed=7)
    assert set(per_source) == {"a", "b", "c"}
    tok = Tokenizer.from_file(p.tokenizer_file)
    for name, ds in per_source.items():
        text = tok.decode(ds[0]["tokens"].tolist())
        assert "Record" in text or len(text) > 0
        # Validation documents are not in the training split (megatron-core splits by document).
        train_docs = train.datasets[[n for n, _, _ in p.sources].index(name)].indices
        assert not set(ds.indices.tolist()) & set(train_docs.tolist())
    assert build_datasets(p, OmegaConf.create(cfg), SEQ, (100, 0, 0), seed=1)[1:] == (None, None)


def test_validation_split_shorter_than_one_sequence_is_left_out(train_stream):
    """A source whose held-out documents do not fill one sequence has no validation set (the
    trainer then evaluates the other sources) instead of a dataset that cannot be indexed."""
    cfg, p, *_ = train_stream
    from omegaconf import OmegaConf

    assert build_eval_datasets(p, OmegaConf.create(cfg), 10**6, seed=7, num_samples=4) == {}
