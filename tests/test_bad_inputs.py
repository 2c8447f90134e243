"""Bad input, everywhere a user can give it, ends with exit code 2 and a message naming the key,
file or line, never a traceback.

Training's config cases run ``python -m pretrain.train`` as a user would (they stop at validation,
before megatron-core or DeepSpeed are imported: a few seconds each). The one-process commands
(export, generate, reshard, import_hf) run their ``main`` in this process, on a small checkpoint
made once. Data and Slurm-launch cases live beside their features (tests/data, test_launch.py).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import FAST, child_env

TINY = FAST + [
    "data=synthetic", "model=tiny-gpt", "model.hidden_size=64", "trainer.seq_length=32",
    "trainer.micro_batch_size=2", "trainer.global_batch_size=2", "trainer.max_steps=4", "checkpoint.interval=2",
    "checkpoint.keep_last=0",
]


def _train(tmp_path, *overrides, run_dir=None):
    cmd = [sys.executable, "-m", "pretrain.train", *TINY, f"hydra.run.dir={run_dir or tmp_path / 'run'}", *overrides]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)


def _assert_user_error(code, stderr: str, *fragments: str) -> None:
    assert code == 2, f"exit code {code}, expected 2:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    for fragment in fragments:
        assert fragment in stderr, f"{fragment!r} not in:\n{stderr[-3000:]}"


# (overrides, fragments the message must contain)
TRAIN_CASES = {
    "seq_length_zero": (["trainer.seq_length=0"], ["trainer.seq_length=0 must be >= 1"]),
    "hidden_dropout_above_one": (["model.hidden_dropout=1.5"], ["model.hidden_dropout=1.5", "[0, 1)"]),
    "attention_dropout_negative": (["model.attention_dropout=-0.1"], ["model.attention_dropout=-0.1"]),
    "resume_misspelled": (["checkpoint.resume=Auto"], ["checkpoint.resume='Auto'", "auto, never"]),
    "vocab_smaller_than_tokenizer": (["model.vocab_size=100"], ["model.vocab_size=100", "data.tokenizer.vocab_size=512"]),
    "zero_layers": (["model.num_layers=0"], ["model.num_layers=0 must be >= 1"]),
    "fewer_layers_than_stages": (["parallel=pp2", "model.num_layers=1"], ["model.num_layers=1", "parallel.pipeline=2"]),
    "world_size_mismatch": (["parallel=tp2"], ["parallel.tensor * parallel.pipeline * parallel.data", "1 process(es)"]),
    "zero_heads": (["model.num_attention_heads=0"], ["model.num_attention_heads=0 must be >= 1"]),
    "heads_not_dividing_hidden": (["model.num_attention_heads=3"], ["model.hidden_size=64", "num_attention_heads=3"]),
    "batch_not_a_multiple": (["trainer.global_batch_size=3"], ["trainer.global_batch_size=3"]),
    "lr_zero": (["optim.lr=0"], ["optim.lr=0"]),
    "beta_above_one": (["optim.betas=[0.9,1.5]"], ["optim.betas"]),
    "decay_before_warmup_ends": (["optim.warmup_tokens=100", "optim.decay_tokens=10"], ["optim.decay_tokens=10"]),
    "eval_without_iterations": (["trainer.eval_interval=5", "trainer.eval_iters=0"], ["trainer.eval_iters=0"]),
    "unknown_precision": (["trainer.precision=fp16"], ["trainer.precision='fp16'"]),
    "unknown_norm": (["model.norm=batchnorm"], ["model.norm='batchnorm'"]),
    "sequence_longer_than_positions": (["trainer.seq_length=4096"], ["model.max_position_embeddings"]),
    "zero_stage_five": (["parallel.zero_stage=5"], ["parallel.zero_stage=5"]),
    "negative_keep_last": (["checkpoint.keep_last=-1"], ["checkpoint.keep_last=-1"]),
    "log_interval_zero": (["logging.interval=0"], ["logging.interval=0"]),
    "negative_spike_factor": (["trainer.loss_spike_factor=-1"], ["trainer.loss_spike_factor=-1"]),
    "init_from_missing": (["model.init_from=/nonexistent/model"], ["model.init_from=/nonexistent/model"]),
    "not_an_integer": (["trainer.seq_length=abc"], ["trainer.seq_length", "could not be composed"]),
    "unknown_key": (["trainer.seq_len=64"], ["seq_len", "could not be composed"]),
    "unknown_model_preset": (["model=gpt5"], ["model/gpt5", "could not be composed"]),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_refuses_bad_config(tmp_path, case):
    overrides, fragments = TRAIN_CASES[case]
    proc = _train(tmp_path, *overrides)
    _assert_user_error(proc.returncode, proc.stderr, *fragments)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_several_problems_are_listed_together(tmp_path):
    proc = _train(tmp_path, "trainer.seq_length=0", "model.hidden_dropout=2", "optim.lr=-1")
    _assert_user_error(proc.returncode, proc.stderr, "trainer.seq_length=0")
    proc = _train(tmp_path, "model.hidden_dropout=2", "optim.lr=-1", "checkpoint.resume=nowhere")
    _assert_user_error(proc.returncode, proc.stderr, "model.hidden_dropout=2", "optim.lr=-1", "checkpoint.resume='nowhere'")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step tiny-gpt run on synthetic data with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    proc = _train(tmp, run_dir=tmp / "run")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "run"


def _copy(run, tmp_path) -> Path:
    shutil.copytree(run, tmp_path / "copy", ignore=shutil.ignore_patterns("universal"))
    return tmp_path / "copy"


def _damage_every_manifest(run: Path) -> None:
    for manifest in (run / "checkpoints").glob("step*/manifest.json"):
        manifest.write_text("{ not json")


def test_resume_from_a_directory_without_checkpoints(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _train(tmp_path, f"checkpoint.resume={tmp_path / 'empty'}")
    _assert_user_error(proc.returncode, proc.stderr, str(tmp_path / "empty"), "no checkpoints")


def test_resume_when_every_manifest_is_damaged(run, tmp_path):
    copy = _copy(run, tmp_path)
    _damage_every_manifest(copy)
    proc = _train(tmp_path, run_dir=copy)
    _assert_user_error(proc.returncode, proc.stderr, "no checkpoint in", "is intact", "unreadable manifest.json")


def test_resume_a_checkpoint_of_another_model(run, tmp_path):
    proc = _train(tmp_path, f"checkpoint.resume={run}", "model.hidden_size=32")
    _assert_user_error(proc.returncode, proc.stderr, "does not fit the configured model", "has shape")


MODULES = {"export": "interop.export", "generate": "interop.generate", "import_hf": "interop.import_hf",
           "reshard": "checkpoint.reshard"}


def _main(module: str, argv: list[str], capsys):
    """(exit code, stderr) of ``python -m pretrain.<module> ARGV``, run in this process."""
    import importlib

    main = importlib.import_module(f"pretrain.{MODULES[module]}").main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code, capsys.readouterr().err


def test_export_of_a_missing_directory(tmp_path, capsys):
    code, err = _main("export", [str(tmp_path / "nowhere"), str(tmp_path / "out")], capsys)
    _assert_user_error(code, err, "nowhere: no such directory")


def test_export_of_a_directory_without_checkpoints(tmp_path, capsys):
    code, err = _main("export", [str(tmp_path), str(tmp_path / "out")], capsys)
    _assert_user_error(code, err, "no checkpoints here")


def test_export_of_a_missing_tag(run, tmp_path, capsys):
    code, err = _main("export", [str(run), str(tmp_path / "out"), "--tag", "step00000099"], capsys)
    _assert_user_error(code, err, "step00000099: no such checkpoint", "step00000002")


def test_export_without_the_run_config(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    (copy / "config.yaml").unlink()
    code, err = _main("export", [str(copy), str(tmp_path / "out")], capsys)
    _assert_user_error(code, err, "config.yaml: resolved run config not found", "--config")


def test_export_with_a_garbage_config(run, tmp_path, capsys):
    (tmp_path / "garbage.yaml").write_text("model: [unclosed\n")
    code, err = _main("export", [str(run), str(tmp_path / "out"), "--config", str(tmp_path / "garbage.yaml")], capsys)
    _assert_user_error(code, err, "garbage.yaml: not a readable run config")


def test_export_when_every_manifest_is_damaged(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    _damage_every_manifest(copy)
    code, err = _main("export", [str(copy), str(tmp_path / "out")], capsys)
    _assert_user_error(code, err, "no checkpoint in", "is intact", "unreadable manifest.json")
    assert not (tmp_path / "out").exists()


def test_export_of_a_tag_and_a_different_tag_flag(run, tmp_path, capsys):
    code, err = _main("export", [str(run / "checkpoints" / "step00000002"), str(tmp_path / "out"), "--tag", "step00000004"], capsys)
    _assert_user_error(code, err, "is checkpoint step00000002, but --tag step00000004")


GENERATE_CASES = {
    "not_integers": (["--prompt-ids", "1,x"], ["--prompt-ids '1,x': expected comma-separated integers"]),
    "negative_id": (["--prompt-ids", "-1"], ["[-1] outside the model's vocabulary [0, 512)"]),
    "id_beyond_vocabulary": (["--prompt-ids", "3,99999"], ["[99999] outside the model's vocabulary"]),
    "text_without_tokenizer": (["--prompt", "hello"], ["no tokenizer", "--prompt-ids"]),
    "top_p_zero": (["--prompt-ids", "1", "--top-p", "0"], ["--top-p 0.0 must be in (0, 1]"]),
    "negative_temperature": (["--prompt-ids", "1", "--temperature", "-1"], ["--temperature -1.0 must be >= 0"]),
    "no_new_tokens": (["--prompt-ids", "1", "--max-new-tokens", "0"], ["--max-new-tokens 0 must be >= 1"]),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_refuses_bad_arguments(run, capsys, case):
    args, fragments = GENERATE_CASES[case]
    code, err = _main("generate", [str(run), *args], capsys)
    _assert_user_error(code, err, *fragments)


def test_generate_from_a_missing_directory(tmp_path, capsys):
    code, err = _main("generate", [str(tmp_path / "nowhere"), "--prompt-ids", "1"], capsys)
    _assert_user_error(code, err, "nowhere: no such directory")


def test_reshard_of_a_missing_directory(tmp_path, capsys):
    code, err = _main("reshard", [str(tmp_path / "nowhere")], capsys)
    _assert_user_error(code, err, "nowhere: no such directory")


def test_reshard_of_a_missing_tag(run, capsys):
    code, err = _main("reshard", [str(run), "--tag", "step00000099"], capsys)
    _assert_user_error(code, err, "step00000099: no such checkpoint")


def test_reshard_of_a_named_tag_with_a_damaged_manifest(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    (copy / "checkpoints" / "step00000004" / "manifest.json").write_text("[]")
    code, err = _main("reshard", [str(copy), "--tag", "step00000004"], capsys)
    _assert_user_error(code, err, "step00000004 is damaged", "unreadable manifest.json")


def test_reshard_of_a_checkpoint_missing_a_file(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    for tag in ("step00000002", "step00000004"):
        (copy / "checkpoints" / tag / "rng" / "rank00000.pt").unlink()
    code, err = _main("reshard", [str(copy)], capsys)
    _assert_user_error(code, err, "rng/rank00000.pt is missing")


def test_import_of_a_missing_folder(tmp_path, capsys):
    code, err = _main("import_hf", [str(tmp_path / "nowhere")], capsys)
    _assert_user_error(code, err, "config.json: missing")


def test_import_of_invalid_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{")
    code, err = _main("import_hf", [str(tmp_path)], capsys)
    _assert_user_error(code, err, "config.json: not valid JSON")


def test_import_of_an_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, err = _main("import_hf", [str(tmp_path)], capsys)
    _assert_user_error(code, err, "model_type=bert")


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.interop.export", str(tmp_path / "nowhere"), str(tmp_path / "o"), "--debug"],
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
    proc = _train(tmp_path, "trainer.seq_length=0", run_dir=tmp_path / "r")
    env = {**child_env(), "HYDRA_FULL_ERROR": "1"}
    full = subprocess.run([sys.executable, "-m", "pretrain.train", *TINY, "trainer.seq_length=0"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and full.returncode == 1 and "Traceback" in full.stderr and "ConfigError" in full.stderr


@pytest.mark.parametrize("overrides,fragment", [
    (["model.num_layer=2"], "num_layer"),
    (["trainer.seq_length=0"], "trainer.seq_length=0 must be >= 1"),
], ids=["unknown_key", "seq_length_zero"])
def test_step_benchmark_refuses_bad_overrides(tmp_path, overrides, fragment):
    proc = subprocess.run([sys.executable, "-m", "pretrain.bench.step", "--steps", "1", *overrides], env=child_env(),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    _assert_user_error(proc.returncode, proc.stderr, "bench.step: error:", fragment)


def _data_conf(tmp_path, path: Path) -> list[str]:
    """Overrides for a one-source data config reading ``path`` (conf/data/one.yaml under tmp_path)."""
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "one.yaml").write_text(
        "defaults: [data_schema, _self_]\nname: one\nprogress: false\n"
        f"sources:\n  - {{name: one, path: {json.dumps(str(path))}, curated: true}}\n"
        "tokenizer: {vocab_size: 300}\nsplit: '1,0,0'\n"
    )
    return ["--config-dir", str(tmp_path / "conf"), "data=one", f"data.cache_dir={tmp_path / 'cache'}"]


def test_train_names_a_missing_data_source_before_starting(tmp_path):
    cmd = [sys.executable, "-m", "pretrain.train", *_data_conf(tmp_path, tmp_path / "missing.jsonl"),
           *[o for o in TINY if not o.startswith("data=")], f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    _assert_user_error(proc.returncode, proc.stderr, "data.sources[0].path", "missing.jsonl does not exist")
    assert not (tmp_path / "cache").exists()


@pytest.mark.distributed
def test_a_bad_record_found_on_rank_0_stops_every_rank(tmp_path):
    """The data is read on rank 0 while rank 1 waits; rank 0's error is broadcast, so rank 1 stops with
    the same message rather than waiting (torchrun, which ends the job at a rank's first failure,
    may cut it short)."""
    docs = [json.dumps({"text": f"document {i} " + "words and more words " * 40}) for i in range(20)]
    (tmp_path / "docs.jsonl").write_text("\n".join(docs[:7] + ['{"text": "cut sh'] + docs[7:]) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pretrain.train",
           *_data_conf(tmp_path, tmp_path / "docs.jsonl"), *[o for o in TINY if not o.startswith("data=")],
           "parallel=dp2", "trainer.global_batch_size=4", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    # torchrun exits 1 when a rank fails, with its own traceback (ChildFailedError) and each rank's exit code.
    assert proc.returncode == 1 and proc.stderr.count("Traceback") == 1 and "ChildFailedError" in proc.stderr, proc.stderr[-4000:]
    assert "train: error:" in proc.stderr and "docs.jsonl line 8" in proc.stderr, proc.stderr[-4000:]
    assert "exitcode  : 2" in proc.stderr, proc.stderr[-4000:]
