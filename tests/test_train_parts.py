"""The training package's parts on their own: the typed read-only config, the batch schedule, the
renamed keys, the test-only fault switch, and the size of the loop."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from harness import child_env
from pretrain.config import CONF_DIR, ModelConfig, ReadOnlyError, register_configs, typed
from pretrain.errors import UserError
from pretrain.train import injection, loop
from pretrain.train.schedule import BatchSchedule


def make(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["data=synthetic", *overrides])


def test_the_run_config_is_typed_and_read_only():
    cfg = typed(make("model=tiny-llama", "optim.lr=1e-3"))
    assert type(cfg.model) is ModelConfig and cfg.optim.lr == 1e-3 and cfg.model.name == "tiny-llama"
    with pytest.raises(ReadOnlyError, match="vocab_size"):
        cfg.model.vocab_size = 512
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = None
    copy = dataclasses.replace(cfg.model, vocab_size=512)  # derived values are new objects
    assert copy.vocab_size == 512 and cfg.model.vocab_size is None
    with pytest.raises(Exception, match="read-only"):
        cfg.data.name = "other"


def test_the_token_ramp_plans_exactly_the_tokens_its_steps_consume():
    cfg = make("trainer.max_steps=12", "trainer.global_batch_size=32", "trainer.micro_batch_size=4",
               "trainer.seq_length=16", "optim.ramp_start_batch=8", "optim.ramp_tokens=2000")
    schedule = BatchSchedule.from_config(cfg)
    tokens, batches = 0, []
    for step in range(12):
        plan = schedule.step(step, tokens)
        batches.append(plan.batch)
        tokens += plan.batch * 16
    assert batches[0] == 8 and batches[-1] == 32 and batches == sorted(batches)
    assert schedule.planned_tokens == tokens and schedule.train_samples * 16 == tokens


def test_the_noise_scale_ramp_sizes_data_for_the_largest_run_and_decays_over_the_batches_used():
    cfg = make("trainer.max_steps=10", "trainer.global_batch_size=32", "trainer.micro_batch_size=4",
               "trainer.seq_length=16", "optim.gns_batch_ramp=true", "optim.gns_ramp_warmup=0",
               "optim.min_lr_ratio=0.1", "optim.lr=1.0", "optim.warmup_tokens=0")
    schedule = BatchSchedule.from_config(cfg)
    assert schedule.train_samples == 10 * 32  # every step at the global batch: the data never runs out
    tokens = 0
    for step in range(10):
        plan = schedule.step(step, tokens, critical=9.0, estimates=5)  # the critical batch: 8 sequences
        assert plan.batch == 8
        tokens += plan.batch * 16
    assert plan.lr == pytest.approx(0.1)  # the cosine ends at the run's real last token, not the bound


def test_a_renamed_key_is_refused_with_its_new_name(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "data=synthetic", "logging.gns_batch_ramp=true"],
                          capture_output=True, text=True, env=child_env(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "train: error: logging.gns_batch_ramp was renamed optim.gns_batch_ramp" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_fault_switch_is_off_unless_set_and_refuses_unknown_faults():
    assert injection.planned({}) is None
    faults = injection.planned({injection.SWITCH: "nan_steps=3,5;step_delay=0.5@1;crash_in_save=4"})
    assert faults == injection.Faults(frozenset({3, 5}), 0.5, 1, 4)
    with pytest.raises(UserError, match="unknown fault 'nan'"):
        injection.planned({injection.SWITCH: "nan=3"})
    with pytest.raises(UserError, match="step_delay=x"):
        injection.planned({injection.SWITCH: "step_delay=x"})


def test_the_training_loop_fits_on_a_screen_and_reads_no_config():
    source = inspect.getsource(loop.train)
    assert len(source.splitlines()) <= 40, f"loop.train is {len(source.splitlines())} lines"
    names = {node.attr for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute)}
    assert "config" not in names and "cfg" not in names


def test_the_launcher_refuses_a_renamed_key_too():
    from pretrain.launch import compose_training

    with pytest.raises(UserError, match="logging.gns_ramp_warmup was renamed optim.gns_ramp_warmup: use optim.gns_ramp_warmup=3"):
        compose_training(["logging.gns_ramp_warmup=3"])
