"""The pre-launch memory check: a plan predicted not to fit is refused before anything starts, naming
the largest term and the cheapest change that fits; warn and off let it through."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from harness import child_env
from pretrain.config import CONF_DIR, register_configs
from pretrain.plan.check import memory_problem, prelaunch
from pretrain.plan.spec import PlanError

# gpt3-xl in bf16 at micro-batch 16 x 1024 tokens on one A100-40GB: about 52 GiB predicted.
TOO_BIG = ["data=synthetic", "model=gpt3-xl", "trainer.precision=bf16", "trainer.seq_length=1024",
           "trainer.micro_batch_size=16", "trainer.global_batch_size=16"]


def make(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_train_refuses_a_plan_that_cannot_fit_before_anything_starts(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", *TOO_BIG, "planner.gpu=A100-40GB",
                           f"hydra.run.dir={run}"], capture_output=True, text=True, env=child_env(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("train: error: the plan needs ") and "than the 40 GiB of a A100-40GB" in err
    assert "the largest term is activations" in err
    assert "The cheapest change that fits: trainer.micro_batch_size=8" in err
    assert "Traceback" not in proc.stderr and not (run / "metrics.jsonl").exists()


def test_the_margin_warn_and_off_settings():
    cfg = make(*TOO_BIG)
    assert memory_problem(cfg, "A100-40GB", 1, margin=0.05) is not None
    assert memory_problem(cfg, "A100-40GB", 1, margin=0.5) is None  # 52 GiB is within 40 GiB x 1.5
    assert memory_problem(cfg, "A100-80GB", 1, margin=0.0) is None


def test_warn_logs_off_skips_and_a_cpu_run_without_a_gpu_name_is_not_checked(caplog):
    with pytest.raises(PlanError, match="planner.check=warn to start anyway"):
        prelaunch(make(*TOO_BIG, "planner.gpu=A100-40GB"), 1)
    with caplog.at_level(logging.WARNING, logger="pretrain.plan.check"):
        prelaunch(make(*TOO_BIG, "planner.gpu=A100-40GB", "planner.check=warn"), 1)
    assert "the largest term is activations" in caplog.text
    prelaunch(make(*TOO_BIG, "planner.gpu=A100-40GB", "planner.check=off"), 1)
    prelaunch(make(*TOO_BIG), 1)  # no CUDA device here and no planner.gpu: nothing to check


def test_a_bad_planner_setting_is_named():
    from pretrain.validate import ConfigError, validate

    with pytest.raises(ConfigError, match="planner.check='sometimes' is not one of refuse, warn, off"):
        validate(make("data=synthetic", "planner.check=sometimes"), 1)
    with pytest.raises(PlanError, match="planner.gpu=V100: unknown GPU .V100."):
        prelaunch(make(*TOO_BIG, "planner.gpu=V100"), 1)


def test_the_slurm_launcher_checks_the_cluster_gpu_before_queuing(capsys):
    from pretrain import launch

    with pytest.raises(SystemExit) as exit_:
        launch.main(["slurm", "cluster=local-cpu", "cluster.gpu=A100-40GB", "--dry-run", *TOO_BIG])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("launch: error: the plan needs "), err


def test_virtual_stages_are_planned_but_refused_by_the_trainer():
    from pretrain.plan.spec import from_config
    from pretrain.validate import ConfigError, validate

    cfg = make("data=synthetic", "parallel=pp2", "model.num_layers=4", "parallel.virtual_stages=2")
    assert from_config(cfg, {}).virtual_stages == 2
    with pytest.raises(ConfigError, match="parallel.virtual_stages=2: training runs the plain 1F1B schedule"):
        validate(cfg, 2)
