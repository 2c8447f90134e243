"""Hugging Face datasets saved with save_to_disk as sources: a Dataset or a DatasetDict's split, read
in batches; the text column checked up front; bad rows under the source's on_bad_record policy."""

from __future__ import annotations

import random

import datasets
import pytest

from data_synth import make_doc
from pretrain.data import DataConfigError, validate_data_config
from pretrain.data.config import SourceConfig
from pretrain.data.sources import BadRecords, read_source, source_files

_rng = random.Random(9)
DOCS = [make_doc(9000 + i, _rng) for i in range(2500)]  # more than one read batch


def _src(path, **kw):
    return SourceConfig(name="hf", path=str(path), **kw)


def _read(src, policy="error"):
    src.on_bad_record = policy
    bad = BadRecords(src, "data.sources[0]")
    return [t for _, t in read_source(src, key="data.sources[0]", bad=bad)], bad


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    ds = datasets.Dataset.from_dict({"text": DOCS, "url": [f"u{i}" for i in range(len(DOCS))]})
    ds.save_to_disk(str(root / "one"), max_shard_size="500KB")  # several Arrow files
    datasets.DatasetDict({"train": ds.select(range(100)), "valid": ds.select(range(100, 120))}).save_to_disk(str(root / "dict"))
    return root


def test_a_saved_dataset_reads_in_order(saved):
    fmt, files = source_files(_src(saved / "one"))
    assert fmt == "hf" and len([f for f in files if f.suffix == ".arrow"]) > 1
    assert _read(_src(saved / "one"))[0] == DOCS


def test_a_dataset_dict_reads_its_train_split_or_the_one_named(saved):
    assert _read(_src(saved / "dict"))[0] == DOCS[:100]
    assert _read(_src(saved / "dict", hf_split="valid"))[0] == DOCS[100:120]
    with pytest.raises(DataConfigError, match=r"holds the splits \['train', 'valid'\]"):
        source_files(_src(saved / "dict", hf_split="test"), key="data.sources[0]")


def test_wrong_column_and_wrong_folder_are_named_before_reading(saved, tmp_path):
    with pytest.raises(DataConfigError, match=r"text_field='body' is not a column .*columns: \['text', 'url'\]"):
        source_files(_src(saved / "one", text_field="body"), key="data.sources[0]")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataConfigError, match="not a folder written by datasets' save_to_disk"):
        source_files(_src(tmp_path / "plain", format="hf"), key="data.sources[0]")
    problems = {"name": "x", "cache_dir": str(tmp_path / "c"),
                "sources": [{"name": "hf", "path": str(saved / "one"), "text_field": "body", "curated": True}]}
    with pytest.raises(DataConfigError, match="not a column"):
        validate_data_config(problems)


def test_bad_rows_follow_the_policy(tmp_path):
    datasets.Dataset.from_dict({"text": [DOCS[0], None, "  ", DOCS[1]]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataConfigError, match=r"bad row 1: field 'text' is null"):
        _read(_src(tmp_path / "bad"))
    docs, bad = _read(_src(tmp_path / "bad"), "drop")
    assert docs == DOCS[:2] and bad.counts == {"null_text": 1, "empty_text": 1}
