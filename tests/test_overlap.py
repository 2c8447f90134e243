"""Communication overlap settings: they reach DeepSpeed, the GPU plans turn them on, and training
with them (bucketed, overlapped gradient reduction) matches the single process."""

import math
import os

import pytest
from hydra import compose, initialize_config_dir

from harness import FAST, REPO, run_jobs
from pretrain.config import register_configs, typed

COMMON = FAST + ["data=synthetic", "model=tiny-gpt", "model.hidden_size=64", "trainer.max_steps=5",
                 "trainer.seq_length=32", "trainer.global_batch_size=8", "optim.warmup_tokens=0", "trainer.seed=5"]
# Buckets far smaller than the model's 0.3M gradients, so every step reduces in several buckets.
OVERLAP = ["parallel.overlap_comm=true", "parallel.contiguous_gradients=true",
           "parallel.reduce_bucket_size=20000", "parallel.allgather_bucket_size=20000"]


def _composed(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "pretrain" / "conf"), version_base="1.3"):
        return typed(compose("config", overrides=["data=synthetic", *overrides]))


def test_the_plan_settings_reach_deepspeeds_zero_section():
    from pretrain.engine.core import deepspeed_config

    cfg = _composed("parallel=dp2_zero2", *OVERLAP)
    zero = deepspeed_config(cfg.parallel, cfg.trainer, cfg.optim, 1)["zero_optimization"]
    assert zero == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                    "reduce_bucket_size": 20000, "allgather_bucket_size": 20000}
    plain = _composed("parallel=single")
    assert deepspeed_config(plain.parallel, plain.trainer, plain.optim, 1)["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("plan", ["dp8_zero1", "tp8_dp4_zero1", "tp8_pp4_dp4_zero1"])
def test_the_gpu_plans_overlap_their_communication(plan):
    par = _composed(f"parallel={plan}").parallel
    assert par.overlap_comm and par.contiguous_gradients and par.reduce_bucket_size == 200_000_000


def test_a_bucket_size_below_one_is_refused_by_name():
    from pretrain.validate import ConfigError, validate

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "pretrain" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["data=synthetic", "parallel=dp2_zero1", "parallel.reduce_bucket_size=0"])
    with pytest.raises(ConfigError, match=r"parallel\.reduce_bucket_size=0 must be >= 1"):
        validate(cfg, world_size=2)


def test_tensor_parallel_runs_serialize_the_gpu_queues(monkeypatch):
    from pretrain.environment import serialize_device_connections

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    serialize_device_connections(1)
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    serialize_device_connections(2)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")  # the user's own value stays
    serialize_device_connections(8)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"


@pytest.mark.distributed
def test_overlapped_bucketed_reduction_matches_the_single_process(tmp_path):
    single = run_jobs(1, {"single": COMMON + ["parallel=single", "trainer.micro_batch_size=8"]}, tmp_path / "one")
    runs = run_jobs(2, {f"{plan}-overlap": COMMON + [f"parallel={plan}", "trainer.micro_batch_size=4", *OVERLAP]
                        for plan in ("dp2_zero1", "dp2_zero2")}, tmp_path / "two")
    want = single["single"]
    assert len(want) == 5
    for name, got in runs.items():
        assert len(got) == 5, name
        for key in ("loss", "grad_norm"):
            for step, (g, w) in enumerate(zip((r[key] for r in got), (r[key] for r in want)), 1):
                assert math.isfinite(g) and abs(g - w) <= 1e-5 * abs(w), f"{name} {key} step {step}: {g} vs {w}"
