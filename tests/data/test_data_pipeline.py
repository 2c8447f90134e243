"""prepare_data: round trip, caching, crash safety, and early errors for bad input."""

import json
from pathlib import Path

import pytest
from rich.console import Console

from data_synth import make_doc, synth_cfg, write_jsonl
from pretrain.data import DataConfigError, prepare_data
from pretrain.data.cache import is_done
from pretrain.data.tasks import plan_text, prepare_partial, publish, read_parts, write_part

QUIET = Console(quiet=True)


def test_round_trip_tokens_text_and_eod(prepared_synth, synth_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    cfg, p = prepared_synth
    tok = Tokenizer.from_file(p.tokenizer_file)
    assert tok.token_to_id("<|endoftext|>") == p.eod_id and tok.get_vocab_size() == p.vocab_size
    root = cfg["cache_dir"]
    # The cleaned input of the shards stage: the last stage's documents for each source.
    import glob

    manifests = sorted(glob.glob(f"{root}/dedup/*/manifest.json"))
    assert len(manifests) == 1
    docs = {n: list(read_parts([Path(root) / r for r in rels])) for n, rels in json.load(open(manifests[0]))["docs"].items()}
    for name, prefix, _ in p.sources:
        ds = IndexedDataset(prefix)
        assert len(ds) == len(docs[name]) == p.docs[name]
        assert int(ds.sequence_lengths.sum()) == p.tokens[name]
        for i, (_, text) in enumerate(docs[name]):
            ids = ds[i].tolist()
            assert ids[-1] == p.eod_id and p.eod_id not in ids[:-1]
            assert ids[:-1] == tok.encode(text, add_special_tokens=False).ids
            assert tok.decode(ids[:-1]) == text


def test_second_call_is_a_cache_hit(prepared_synth):
    cfg, p = prepared_synth
    again = prepare_data(cfg, console=QUIET)
    assert again.cache_hit and again.shard_dir == p.shard_dir and again.sources == p.sources


def test_crash_mid_stage_leaves_nothing_readable(tmp_path):
    """A stage's tasks write into its partial folder; until publish, nothing exists under its key."""
    target = tmp_path / "stage" / "key"
    partial = tmp_path / "stage" / ".key.partial"
    prepare_partial(partial, tmp_path / "_logs", plan_text([0], {}))
    write_part(partial / "a" / "part-00000.jsonl", [("0", "half")])  # then the job is killed
    assert not target.exists() and not is_done(target)
    publish(partial, target, {"docs": {"a": ["stage/key/a/part-00000.jsonl"]}})
    assert is_done(target) and not partial.exists() and sorted(p.name for p in target.iterdir()) == ["a", "manifest.json"]


def test_report_written(prepared_synth):
    _, p = prepared_synth
    rep = json.load(open(f"{p.shard_dir}/mixture_report.json"))
    assert [r["source"] for r in rep["sources"]] == ["a", "b", "c"]
    assert abs(sum(r["weight"] for r in rep["sources"]) - 1) < 1e-9
    for r in rep["sources"]:
        assert abs(r["epochs"] - r["weight"] * rep["token_budget"] / r["train_tokens"]) < 1e-9


# ---- bad input fails before work starts -------------------------------------------------------------


def _expect(cfg, match):
    with pytest.raises(DataConfigError, match=match):
        prepare_data(cfg, console=QUIET)


def test_missing_file(synth_dir, tmp_path):
    cfg = synth_cfg(synth_dir, tmp_path)
    cfg["sources"][1]["path"] = str(tmp_path / "nope.jsonl")
    _expect(cfg, r"data\.sources\[1\]\.path: .*nope.jsonl does not exist.*source .b.")
    assert not (tmp_path / "clean").exists()  # nothing ran


def test_absent_text_field(synth_dir, tmp_path):
    cfg = synth_cfg(synth_dir, tmp_path)
    cfg["sources"][0]["text_field"] = "body"
    _expect(cfg, r"data\.sources\[0\]\.text_field='body' is not a field")


@pytest.mark.parametrize(
    "weights, match",
    [((-0.1, 0.5, 0.6), r"weight=-0.1 is negative"), ((0.0, 0.0, 0.0), "sum to zero"), ((0.5, None, 0.5), "give every source")],
)
def test_bad_weights(synth_dir, tmp_path, weights, match):
    cfg = synth_cfg(synth_dir, tmp_path)
    for s, w in zip(cfg["sources"], weights):
        s["weight"] = w
    _expect(cfg, match)


def test_empty_source_after_filtering(synth_dir, tmp_path):
    short = write_jsonl(tmp_path / "short.jsonl", ["too short"] * 5)
    cfg = synth_cfg(synth_dir, tmp_path / "cache")
    cfg["sources"][2]["path"] = str(short)
    _expect(cfg, r"\['c'\] have no documents left after clean")


def test_vocabulary_without_eod(synth_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    cfg = synth_cfg(synth_dir, tmp_path, tokenizer={"kind": "file", "path": str(tmp_path / "tok.json")})
    _expect(cfg, "no end-of-text token '<\\|endoftext\\|>'")


def test_unknown_keys_and_overrides_are_named(synth_dir, tmp_path):
    cfg = synth_cfg(synth_dir, tmp_path)
    cfg["sources"][0]["overrides"] = {"clean": {"min_charz": 5}}
    _expect(cfg, r"data\.sources\[0\]\.overrides: .*min_charz")
    cfg = synth_cfg(synth_dir, tmp_path, stages={"dedupe": {}})
    _expect(cfg, "dedupe")


def test_text_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import random

    rng = random.Random(5)
    (tmp_path / "txt").mkdir()
    for i in range(6):
        (tmp_path / "txt" / f"{i}.txt").write_bytes(make_doc(i, rng).encode() + b" Bad \xff byte here.")
    pq.write_table(pa.table({"content": [make_doc(100 + i, rng) for i in range(6)]}), tmp_path / "p.parquet")
    cfg = {
        "name": "formats", "cache_dir": str(tmp_path / "cache"), "progress": False, "num_workers": 1,
        "sources": [
            {"name": "txt", "path": str(tmp_path / "txt"), "curated": True},
            {"name": "pq", "path": str(tmp_path / "p.parquet"), "text_field": "content", "curated": True},
        ],
        "tokenizer": {"vocab_size": 300}, "split": "1,0,0",
        "stages": {"clean": {"max_invalid_utf8_fraction": 0.01}},
    }
    p = prepare_data(cfg, console=QUIET)
    assert p.docs == {"txt": 6, "pq": 6}
    assert p.stage_stats["clean"]["txt"]["reasons"]["utf8_repaired"] == 6
