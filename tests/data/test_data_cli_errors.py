"""``python -m pretrain.data`` with a bad data config or bad input: exit 2, the key or file named
on stderr, no traceback. Also validate_data_config, which lists every problem at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_synth import make_doc
from pretrain.data import DataConfigError, validate_data_config

REPO = Path(__file__).resolve().parents[2]


def _good_jsonl(path, n=4, bad_line=None):
    import random

    rng = random.Random(3)
    lines = [json.dumps({"text": make_doc(i, rng)}) for i in range(n)]
    if bad_line is not None:
        lines.insert(bad_line - 1, '{"text": "cut sh')
    path.write_text("\n".join(lines) + "\n")
    return path


def _run_data(tmp_path, yaml_body: str):
    """Run ``python -m pretrain.data data=bad`` with conf/data/bad.yaml = yaml_body."""
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    (conf / "bad.yaml").write_text("defaults: [data_schema, _self_]\nname: bad\nprogress: false\n" + yaml_body)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, "-m", "pretrain.data", "--config-dir", str(tmp_path / "conf"), "data=bad",
         f"data.cache_dir={tmp_path / 'cache'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def _sources(*entries):
    return "sources:\n" + "".join(f"  - {json.dumps(e)}\n" for e in entries) + "tokenizer: {vocab_size: 300}\nsplit: '1,0,0'\n"


def _cases(tmp_path):
    ok = str(_good_jsonl(tmp_path / "ok.jsonl"))
    return {
        "missing_path": (_sources({"name": "a", "path": ok, "curated": True}, {"name": "b", "path": str(tmp_path / "nope.jsonl"), "curated": True}),
                         ["data.sources[1].path", "nope.jsonl does not exist"]),
        "unknown_builtin": (_sources({"name": "a", "path": "builtin:nope", "curated": True}),
                            ["data.sources[0].path='builtin:nope'", "unknown built-in corpus 'nope'"]),
        "bad_weight": (_sources({"name": "a", "path": ok, "curated": True, "weight": -1}),
                       ["data.sources[0].weight=-1.0 is negative"]),
        "bad_policy": (_sources({"name": "a", "path": ok, "curated": True, "on_bad_record": "skip"}),
                       ["data.sources[0].on_bad_record='skip'", "choose one of error|drop"]),
        "bad_record": (_sources({"name": "a", "path": str(_good_jsonl(tmp_path / "cut.jsonl", bad_line=3)), "curated": True}),
                       ["data.sources[0]", "cut.jsonl line 3", "not valid JSON", "on_bad_record=drop"]),
    }


@pytest.mark.parametrize("case", ["missing_path", "unknown_builtin", "bad_weight", "bad_policy", "bad_record"])
def test_cli_bad_config_exits_2_naming_the_key(case, tmp_path):
    body, fragments = _cases(tmp_path)[case]
    r = _run_data(tmp_path, body)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.count("data: error: ") == 1
    for f in fragments:
        assert f in r.stderr, (f, r.stderr[-2000:])


def test_validate_lists_every_problem_at_once(tmp_path):
    ok = _good_jsonl(tmp_path / "ok.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    cfg = {
        "name": "x", "cache_dir": str(tmp_path / "cache"),
        "sources": [
            {"name": "a", "path": str(ok), "weight": 0.5, "curated": True, "on_bad_record": "ignore"},
            {"name": "b", "path": str(tmp_path / "missing"), "weight": -2},
            {"name": "c", "path": "builtin:nope", "weight": 1},
            {"name": "a", "path": str(tmp_path / "empty.jsonl"), "weight": 1, "max_docs": 0},
            {"name": "e", "path": str(tmp_path / "*.parquet"), "weight": 1, "overrides": {"dedup": {"threshold": 1.5}}},
        ],
        "split": "0,1,0",
        "tokenizer": {"vocab_size": 100},
        "stages": {"clean": {"max_invalid_utf8_fraction": 2, "max_repeated_span_fraction": 0},
                   "dedup": {"lsh_weights": [0.5, 0.6]}},
        "eval_files": [str(tmp_path / "eval.txt")],
        "num_workers": 0,
    }
    with pytest.raises(DataConfigError) as e:
        validate_data_config(cfg)
    msg = str(e.value)
    expected = [
        "data.sources[0].on_bad_record='ignore'",
        "data.sources[1].path: ", "missing does not exist",
        "data.sources[1].weight=-2.0 is negative",
        "data.sources[2].path='builtin:nope': unknown built-in corpus",
        "data.sources[3].name='a': data.sources[0] has that name too",
        "data.sources[3].max_docs=0",
        "data.sources[3].path: ", "empty.jsonl empty (0 bytes)",
        "data.sources[4].path: the pattern", "matches no files",
        "data.sources[4].overrides.dedup.threshold=1.5",
        "data.split='0,1,0': the train share is 0",
        "data.tokenizer.vocab_size=100",
        "data.stages.clean.max_invalid_utf8_fraction=2",
        "data.stages.clean.max_repeated_span_fraction=0.0: must be > 0 and <= 1",
        "data.stages.dedup.lsh_weights=[0.5, 0.6]: give two weights in [0, 1] summing to 1",
        "data.eval_files[0]: ", "eval.txt does not exist",
        "data.num_workers=0",
    ]
    for frag in expected:
        assert frag in msg, (frag, msg)
    assert msg.startswith("data config: 16 problems:\n")
    assert not (tmp_path / "cache").exists()  # validation starts nothing


def test_validate_schema_problems_named_per_source():
    with pytest.raises(DataConfigError) as e:
        validate_data_config({"name": "x", "sources": [{"name": "a"}, {"path": "p", "nme": "b"}], "stages": {"dedupe": {}}})
    msg = str(e.value)
    for frag in ["data.stages.dedupe: Key 'dedupe' not in", "data.sources[0].path: required", "data.sources[1].nme: Key 'nme' not in"]:
        assert frag in msg, (frag, msg)


def test_validate_reads_no_corpus_and_accepts_good_configs(tmp_path):
    """A file whose later records are garbage passes validation (only the top is peeked at); a
    glob source is resolved; the synthetic config needs nothing."""
    p = _good_jsonl(tmp_path / "part-0.jsonl", n=120, bad_line=110)
    _good_jsonl(tmp_path / "part-1.jsonl")
    cfg = {"name": "x", "cache_dir": str(tmp_path / "cache"), "sources": [{"name": "a", "path": str(tmp_path / "part-*.jsonl"), "curated": True}]}
    validate_data_config(cfg)
    from pretrain.data.sources import source_files
    from pretrain.data.config import SourceConfig

    assert source_files(SourceConfig(name="a", path=str(tmp_path / "part-*.jsonl")))[1] == [p, tmp_path / "part-1.jsonl"]
    validate_data_config({"name": "synthetic", "tokenizer": {"kind": "synthetic", "vocab_size": 512}})


def test_presets_validate():
    from hydra import compose, initialize_config_dir

    from pretrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "pretrain" / "conf"), version_base="1.3"):
        for name in ("builtin", "tiny", "synthetic"):
            validate_data_config(compose("prepare", overrides=[f"data={name}"]).data)
        gpt3 = compose("prepare", overrides=["data=gpt3_mix", "data.root=/nonexistent/gpt3"]).data
    with pytest.raises(DataConfigError) as e:
        validate_data_config(gpt3)
    msg = str(e.value)
    assert "data.root=/nonexistent/gpt3: not a folder" in msg
    assert all(f"data.sources[{i}].path: /nonexistent/gpt3/" in msg for i in range(5))


def test_cli_overrides_hydra_cannot_compose_exit_2():
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-m", "pretrain.data", "data.nope=1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data.nope" in proc.stderr and "data: error: the configuration could not be composed" in proc.stderr
    assert "Traceback" not in proc.stderr
