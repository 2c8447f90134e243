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


def test_same_seed_same_order_other_seed_differs(prepared_synth, train_stream):
    """Determinism (not a resume): two builds with one seed give the same stream, another seed not."""
    cfg, p, train, *_ = train_stream
    from omegaconf import OmegaConf

    again, _, _ = build_datasets(p, OmegaConf.create(cfg), SEQ, (6000, 40, 40), seed=7)
    other, _, _ = build_datasets(p, OmegaConf.create(cfg), SEQ, (6000, 40, 40), seed=8)
    idx = list(range(0, 6000, 37))
    assert all((train[i]["tokens"] == again[i]["tokens"]).all() for i in idx)
    assert not all((train[i]["tokens"] == other[i]["tokens"]).all() for i in idx[:50])


def _steps(ds, first_step, last_step, global_batch, micro, dp):
    """Token rows consumed by steps [first, last), in the trainer's order (trainer.micro_batches:
    micro-step j of a step starting at sample s covers s + j*micro*dp...; DP rank r takes its
    ``micro`` of them), every rank's rows concatenated."""
    rows = []
    for step in range(first_step, last_step):
        first = step * global_batch
        for start in range(first, first + global_batch, micro * dp):
            for r in range(dp):
                lo = start + r * micro
                rows += [ds[i]["tokens"].tolist() for i in range(lo, lo + micro)]
    return rows


def test_resume_from_consumed_samples_continues_the_stream(train_stream):
    """A run stopped after k steps and resumed from its consumed-sample count (a fresh build, here
    for a longer plan, as when trainer.max_steps is raised on resume) consumes exactly what the
    uninterrupted run does, across an epoch boundary of every source, and replays nothing."""
    cfg, p, train, *_ = train_stream
    from omegaconf import OmegaConf

    G, micro, dp, k, total = 64, 4, 2, 30, 60  # 60 steps x 64 = 3840 samples
    assert total * G > 2 * max(ds.samples_per_epoch for ds in train.datasets)
    uninterrupted = _steps(train, 0, total, G, micro, dp)
    before = _steps(train, 0, k, G, micro, dp)
    resumed_ds, _, _ = build_datasets(p, OmegaConf.create(cfg), SEQ, (9000, 0, 0), seed=7)
    after = _steps(resumed_ds, k, total, G, micro, dp)  # first sample: consumed = k * G
    assert before + after == uninterrupted
    # Not trivially so: restarting the stream at sample 0 would replay the first steps.
    assert _steps(resumed_ds, 0, 2, G, micro, dp) != after[: 2 * G]


def test_report_holds_tokens_weights_and_epochs_per_source(prepared_synth):
    """The mixture report (returned, printed and written) gives each source's tokens, training
    tokens (the train share of the split), the configured weight, epochs = weight x budget / train
    tokens, and the bad records dropped while reading it."""
    import io
    import json

    from rich.console import Console

    from pretrain.data.mixture import print_report

    cfg, p = prepared_synth
    rep = p.report
    assert [r["source"] for r in rep["sources"]] == ["a", "b", "c"]
    assert rep["token_budget"] == sum(r["train_tokens"] for r in rep["sources"])  # no data.token_budget
    for r, w in zip(rep["sources"], (0.5, 0.3, 0.2)):
        assert r["tokens"] == p.tokens[r["source"]] > 0
        assert r["train_tokens"] == int(0.8 * r["tokens"])  # split 80,10,10
        assert r["weight"] == pytest.approx(w)
        assert r["epochs"] == pytest.approx(w * rep["token_budget"] / r["train_tokens"])
        assert r["repeated"] == (r["epochs"] > 3.0) and r["bad_records"] == 0
    assert json.load(open(f"{p.shard_dir}/mixture_report.json")) == rep
    out = io.StringIO()
    print_report(Console(file=out, width=200), rep)
    table = out.getvalue()
    assert "bad records dropped" in table and "epochs elapsed" in table
    for r in rep["sources"]:
        line = next(ln for ln in table.splitlines() if ln.split("│")[1:2] == [f" {r['source']} "] or ln.startswith(f"│ {r['source']} "))
        assert f"{r['tokens']:,}" in line and f"{r['weight']:.1%}" in line and f"{r['epochs']:.2f}" in line


def test_valid_test_disjoint_from_train_and_per_source(train_stream):
    cfg, p, train, valid, test, _ = train_stream
    import re

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from omegaconf import OmegaConf

    per_source = build_eval_datasets(p, OmegaConf.create(cfg), SEQ, seed=7)
    assert set(per_source) == {"a", "b", "c"}
    tok = Tokenizer.from_file(p.tokenizer_file)
    first_record = {"a": 0, "b": 120, "c": 200}  # conftest: a holds Records 0-119, b 120-199, c 200-259
    for name, ds in per_source.items():
        prefix = dict((n, pre) for n, pre, _ in p.sources)[name]
        docs = IndexedDataset(prefix)
        texts = {int(k): tok.decode(docs[int(k)][:-1].tolist()) for k in ds.indices}
        # The validation split of "80,10,10" is the documents from 80% to 90% of the source.
        assert sorted(texts) == list(range(round(0.8 * len(docs)), round(0.9 * len(docs)))), name
        # Each validation document is the source's own: document k of source a is Record k, etc.
        for k, text in texts.items():
            assert text.startswith(f"Record {first_record[name] + k} opens the account"), (name, k, text[:40])
        # Every sample is made of those documents only: each piece between end-of-text tokens
        # decodes to a substring of one of them (so no other split or source leaks in).
        pieces = 0
        for i in range(len(ds)):
            ids = ds[i]["tokens"].tolist()
            assert len(ids) == SEQ
            for piece in (tok.decode(part) for part in _split(ids, p.eod_id)):
                if piece:
                    assert any(piece in t for t in texts.values()), (name, i, piece)
                    pieces += 1
        assert pieces >= len(ds)
        heads = {int(m) for i in range(len(ds)) for m in re.findall(r"Record (\d+) opens", tok.decode(ds[i]["tokens"].tolist()))}
        assert heads and heads <= {first_record[name] + k for k in texts}
        # Validation documents are not in the training split (megatron-core splits by document).
        train_docs = train.datasets[[n for n, _, _ in p.sources].index(name)].indices
        assert not set(ds.indices.tolist()) & set(train_docs.tolist())
    # The trainer asks for training samples only, (n, 0, 0): its documents are still the train
    # split's, never the validation documents evaluated above.
    train_only, *rest = build_datasets(p, OmegaConf.create(cfg), SEQ, (100, 0, 0), seed=1)
    assert rest == [None, None]
    for k, name in enumerate(n for n, _, _ in p.sources):
        assert train_only.datasets[k].indices.tolist() == train.datasets[k].indices.tolist(), name


def _split(ids, eod):
    part = []
    for t in ids:
        if t == eod:
            yield part
            part = []
        else:
            part.append(t)
    yield part


def test_validation_split_shorter_than_one_sequence_is_left_out(train_stream):
    """A source whose held-out documents do not fill one sequence has no validation set (the
    trainer then evaluates the other sources) instead of a dataset that cannot be indexed."""
    cfg, p, *_ = train_stream
    from omegaconf import OmegaConf

    assert build_eval_datasets(p, OmegaConf.create(cfg), 10**6, seed=7, num_samples=4) == {}
