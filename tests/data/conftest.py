"""Shared fixtures: small synthetic corpora (unique, clean prose) and one prepared mixture."""

from __future__ import annotations

import random

import pytest

from data_synth import make_doc, synth_cfg, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """Three JSONL sources (a: 120 docs, b: 80, c: 60), disjoint and unique."""
    d = tmp_path_factory.mktemp("synth")
    rng = random.Random(0)
    sizes = {"a": 120, "b": 80, "c": 60}
    start = 0
    for name, n in sizes.items():
        write_jsonl(d / f"{name}.jsonl", [make_doc(start + i, rng) for i in range(n)])
        start += n
    return d


@pytest.fixture(scope="session")
def prepared_synth(synth_dir, tmp_path_factory):
    from rich.console import Console

    from pretrain.data import prepare_data

    cfg = synth_cfg(synth_dir, tmp_path_factory.mktemp("cache"))
    return cfg, prepare_data(cfg, console=Console(quiet=True))
