"""Secrets stay out of what a run writes: config.yaml, .hydra/, W&B files, sbatch scripts, dry-run output."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness import REPO, run_train
from pretrain import launch
from pretrain.redact import REDACTED, is_secret_name, redacted_config, redacted_yaml

SENTINEL = "sentinel-5f3a9c1e-do-not-write"


@pytest.mark.parametrize("name, secret", [
    ("WANDB_API_KEY", True), ("HF_TOKEN", True), ("AWS_SECRET_ACCESS_KEY", True), ("DB_PASSWORD", True),
    ("apiKey", True), ("GithubToken", True), ("api_key", True), ("client_secret", True),
    ("NCCL_DEBUG", False), ("TOKENIZERS_PARALLELISM", False), ("tokenizer", False), ("warmup_tokens", False),
    ("eod_token", False), ("MASTER_ADDR", False),
])
def test_which_names_look_secret(name, secret):
    assert is_secret_name(name) is secret


def test_redacted_config_keeps_env_interpolations_and_redacts_secret_keys():
    env = {"MY_SOURCE": SENTINEL, "WANDB_API_KEY": "another-" + SENTINEL, "HOME": "/home/u"}
    cfg = OmegaConf.create({
        "model": {"name": "m", "hidden": 64, "heads": "${.hidden}", "note": "${oc.env:MY_SOURCE}"},
        "logging": {"api_key": "literal-" + SENTINEL, "eod_token": "<|endoftext|>", "warmup_tokens": 7,
                    "copy": "${model.note}", "home": "${oc.env:HOME}/x", "pasted": "x-another-" + SENTINEL + "-y"},
        "list": ["${oc.env:MY_SOURCE}", "plain", "${model.hidden}"],
        "unset": "${oc.env:PRETRAIN_TEST_UNSET_VARIABLE}",
    })
    out = redacted_config(cfg, environ=env)
    assert SENTINEL not in repr(out)
    assert out["model"] == {"name": "m", "hidden": 64, "heads": 64, "note": "${oc.env:MY_SOURCE}"}
    assert out["logging"] == {"api_key": REDACTED, "eod_token": "<|endoftext|>", "warmup_tokens": 7,
                              "copy": "${model.note}", "home": "${oc.env:HOME}/x", "pasted": REDACTED}
    assert out["list"] == ["${oc.env:MY_SOURCE}", "plain", 64]
    assert out["unset"] == "${oc.env:PRETRAIN_TEST_UNSET_VARIABLE}"
    back = OmegaConf.create(redacted_yaml(cfg, environ=env))  # what OmegaConf.load gives for config.yaml
    assert back.model.heads == 64 and OmegaConf.to_container(back.model)["note"] == "${oc.env:MY_SOURCE}"


# ---------------------------------------------------------------------------------------------
# sbatch scripts: secret-looking cluster.env entries are passed by name (sbatch --export), never written.

LAUNCH = ["slurm", "cluster=local-cpu", "parallel=dp2", "data=synthetic", "model=tiny-gpt", "cluster.job_name=sec"]


def _sbatch_stub(tmp_path, monkeypatch) -> Path:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "sbatch").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$0.args"\n'
                                  'echo "${WANDB_API_KEY:+key-is-set}" > "$0.env"\necho 4242\n')
    (stubs / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stubs}{os.pathsep}{os.environ['PATH']}")
    return stubs / "sbatch"


def test_dry_run_and_script_name_a_secret_but_never_hold_its_value(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    for ref in ("null", "${oc.env:WANDB_API_KEY}"):
        assert launch.main([*LAUNCH, f"cluster.env.WANDB_API_KEY={ref}", "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert SENTINEL not in out
        assert "#SBATCH --export=ALL,WANDB_API_KEY\n" in out
        assert ': "${WANDB_API_KEY:?is not set' in out and "export WANDB_API_KEY" not in out
    script = tmp_path / "job.sbatch"
    assert launch.main([*LAUNCH, "cluster.env.WANDB_API_KEY=null", "--dry-run", "--output", str(script)]) == 0
    assert SENTINEL not in script.read_text() and SENTINEL not in capsys.readouterr().out


def test_a_secret_value_in_the_cluster_config_is_refused(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for entry in (f"cluster.env.WANDB_API_KEY={SENTINEL}", f"cluster.env.HF_TOKEN={SENTINEL}",
                  "cluster.env.HF_TOKEN=${oc.env:WANDB_API_KEY}"):
        with pytest.raises(SystemExit) as exit_:
            launch.main([*LAUNCH, entry, "--dry-run"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2
        assert f"launch: error: {entry.split('=')[0]}: looks like a secret" in err and SENTINEL not in err


def test_submitting_needs_the_secret_in_the_environment_and_passes_it_by_name(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    sbatch = _sbatch_stub(tmp_path, monkeypatch)
    script = tmp_path / "job.sbatch"
    args = [*LAUNCH, f"cluster.runs_dir={tmp_path / 'runs'}", "cluster.env.WANDB_API_KEY=null", "--output", str(script)]
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_:
        launch.main(args)
    assert exit_.value.code == 2
    assert "launch: error: WANDB_API_KEY not set in this shell" in capsys.readouterr().err
    assert not Path(f"{sbatch}.args").exists(), "nothing may be submitted"

    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    assert launch.main(args) == 0
    assert "submitted job 4242" in capsys.readouterr().out
    assert Path(f"{sbatch}.args").read_text().splitlines() == ["--parsable", str(script)]
    assert Path(f"{sbatch}.env").read_text().strip() == "key-is-set"  # sbatch runs in the submitting env
    assert SENTINEL not in script.read_text()


def test_the_job_script_checks_for_the_secret_by_name(tmp_path):
    """The rendered script, run by bash with srun/scontrol stubbed: the job sees the variable or stops, naming it."""
    name, cluster_overrides, training = launch.split_overrides(LAUNCH[1:] + [f"cluster.workdir={tmp_path}",
                                                                             "cluster.env.WANDB_API_KEY=null"])
    script = tmp_path / "job.sbatch"
    script.write_text(launch.render(launch.compose_training(training), launch.load_cluster(name, cluster_overrides), training))
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for stub, body in {"srun": 'echo "srun sees ${WANDB_API_KEY:+the key}"', "scontrol": "echo localhost"}.items():
        (stubs / stub).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / stub).chmod(0o755)
    env = {"PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "sec",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1"}
    ok = subprocess.run(["bash", str(script)], env={**env, "WANDB_API_KEY": SENTINEL}, capture_output=True, text=True)
    assert ok.returncode == 0 and "srun sees the key" in ok.stdout, ok.stderr
    missing = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "srun sees" not in missing.stdout
    assert "WANDB_API_KEY: is not set: export it in the shell that runs sbatch" in missing.stderr


# ---------------------------------------------------------------------------------------------
# A training run with W&B (offline): no written file holds the secret.


def _files_holding(root: Path, needle: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes())


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secret-run")
    run = tmp / "run"
    env = {"WANDB_API_KEY": SENTINEL, "WANDB_MODE": "offline", "WANDB_DIR": str(run), "WANDB_CACHE_DIR": str(tmp / "wc"),
           "WANDB_CONFIG_DIR": str(tmp / "wcfg")}
    run_train(["data=synthetic", "model=tiny-gpt", "model.num_layers=2", "model.hidden_size=64", "trainer.max_steps=2",
               "trainer.seq_length=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
               "trainer.progress_bar=false", "trainer.eval_interval=0", "logging.plot=false", "logging.wandb=true",
               "logging.gns=false", "model.reference_params=${oc.env:WANDB_API_KEY}", f"hydra.run.dir={run}"],
              cwd=tmp, env=env, timeout=600)
    return run, env


def test_no_file_of_a_training_run_holds_the_secret(secret_run):
    run, _ = secret_run
    written = [p for p in run.rglob("*") if p.is_file()]
    assert (run / "config.yaml").is_file() and (run / ".hydra" / "config.yaml").is_file()
    assert any(p.suffix == ".wandb" for p in written), "the offline W&B run must have been written"
    assert any(p.name == "debug.log" for p in written)
    assert _files_holding(run, SENTINEL) == []
    assert "reference_params: ${oc.env:WANDB_API_KEY}" in (run / "config.yaml").read_text()


def test_the_written_config_loads_back_with_the_same_model(secret_run):
    run, env = secret_run
    from pretrain.interop import export

    cfg, ckpt_dir, tag = export.locate(str(run))
    expected = launch.compose_training(["data=synthetic", "model=tiny-gpt", "model.num_layers=2", "model.hidden_size=64"])
    model = OmegaConf.to_container(cfg.model, resolve=False)
    assert model.pop("reference_params") == "${oc.env:WANDB_API_KEY}"
    assert model.pop("vocab_size") == 512  # filled in from the tokenizer by the trainer
    reference = {k: v for k, v in OmegaConf.to_container(expected.model).items() if k not in ("reference_params", "vocab_size")}
    assert model == reference and tag == "step00000002"
    proc = subprocess.run([sys.executable, "-m", "pretrain.interop.generate", str(run), "--prompt-ids", "1,2,3",
                           "--max-new-tokens", "2"], env={**os.environ, **env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SENTINEL not in proc.stdout + proc.stderr
