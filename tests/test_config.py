"""Composition of the presets, and validation: every bad config is refused with a message naming
the keys and the fix, before any process group exists."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from harness import REPO, child_env
from pretrain.engine import groups as distributed
from pretrain.config import register_configs, world_size
from pretrain.model.layers import ffn_hidden_size
from pretrain.train.trainer import Trainer
from pretrain.validate import ConfigError, validate

register_configs()


def make(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "pretrain" / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def presets(group):
    return sorted(p.stem for p in (REPO / "pretrain" / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("name", presets("model"))
def test_every_model_preset_composes_and_validates(name):
    cfg = make(f"model={name}", "data=synthetic")
    validate(cfg, world_size=1)
    assert cfg.model.name == name


def test_presets_reproduce_the_reference_tables():
    want = {  # name: (layers, d_model, heads)
        "gpt3-small": (12, 768, 12), "gpt3-medium": (24, 1024, 16), "gpt3-large": (24, 1536, 16),
        "gpt3-xl": (24, 2048, 24), "gpt3-2.7b": (32, 2560, 32), "gpt3-6.7b": (32, 4096, 32),
        "gpt3-13b": (40, 5120, 40), "gpt3-175b": (96, 12288, 96),
        "gpt2-124m": (12, 768, 12), "gpt2-355m": (24, 1024, 16), "gpt2-774m": (36, 1280, 20), "gpt2-1.5b": (48, 1600, 25),
        "llama-7b": (32, 4096, 32), "llama-13b": (40, 5120, 40), "llama-33b": (60, 6656, 52), "llama-65b": (80, 8192, 64),
        "gpt1": (12, 768, 12),
    }
    for name, (layers, d, heads) in want.items():
        m = make(f"model={name}", "data=synthetic").model
        assert (m.num_layers, m.hidden_size, m.num_attention_heads) == (layers, d, heads), name
    assert make("model=gpt3-2.7b").model.hidden_size // 32 == 80  # d_head 80
    assert make("model=gpt3-xl").model.head_dim == 128
    llama = make("model=llama-7b").model
    assert (llama.norm, llama.position_embedding, llama.activation, llama.bias) == ("rmsnorm", "rope", "swiglu", False)
    assert ffn_hidden_size(llama) == 11008  # 2/3 * 4 * 4096 rounded up to a multiple of 256
    assert ffn_hidden_size(make("model=gpt1").model) == 3072


def _plan_config(name):
    """A config that parallel plan ``name`` fits (every other rule satisfied)."""
    cfg = make(f"parallel={name}", "data=synthetic", "model=tiny-llama", "model.num_kv_heads=4",
               "trainer.micro_batch_size=1", "trainer.global_batch_size=64")
    if cfg.parallel.tensor > 4:  # the GPU plans: a model with enough heads
        cfg = make(f"parallel={name}", "model=gpt3-xl", "data=synthetic", "trainer.micro_batch_size=1",
                   "trainer.global_batch_size=64", "trainer.seq_length=2048")
    return cfg


@pytest.mark.parametrize("name", presets("parallel"))
def test_every_parallel_plan_validates_at_its_world_size(name):
    cfg = _plan_config(name)
    validate(cfg, world_size=world_size(cfg.parallel))


@pytest.mark.parametrize("name", presets("parallel"))
def test_every_parallel_plan_is_refused_at_another_world_size(name):
    """tp * pp * dp (* cp) must equal the number of launched processes: one too few, one too many, twice
    as many (and a single process) are each refused with exactly that one problem, naming the keys, the
    plan's sizes, the launched count and the fix."""
    cfg = _plan_config(name)
    tp, pp, dp, cp = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.data, cfg.parallel.context
    want = world_size(cfg.parallel)
    keys, sizes = "parallel.tensor * parallel.pipeline * parallel.data", f"{tp}*{pp}*{dp}"
    if cp > 1:
        keys, sizes = keys + " * parallel.context", f"{sizes}*{cp}"
    for world in sorted({1, want - 1, want + 1, 2 * want} - {0, want}):
        with pytest.raises(ConfigError) as err:
            validate(cfg, world_size=world)
        assert len(err.value.problems) == 1, (name, world, err.value.problems)
        message = err.value.problems[0]
        for fragment in (keys, f"= {sizes} = {want}",
                         f"{world} process(es) were launched", f"launch {want}", f"multiply to {world}"):
            assert fragment in message, f"{name} at world size {world}: {fragment!r} not in {message!r}"


BAD = {
    "world size": (["parallel=tp2"], 1, ["parallel.tensor * parallel.pipeline * parallel.data", "launch 2"]),
    # More processes than the plan uses (WORLD_SIZE as torchrun sets it): refused, not silently idle.
    "world size too large": (["parallel=dp2_zero1", "trainer.micro_batch_size=4", "trainer.global_batch_size=8"], 4,
                             ["parallel.tensor * parallel.pipeline * parallel.data = 1*1*2 = 2",
                              "4 process(es) were launched", "launch 2"]),
    "heads vs tp": (["parallel=tp2", "model.num_attention_heads=1"], 2, ["model.num_attention_heads=1", "parallel.tensor=2"]),
    "kv heads vs tp": (["parallel=tp2", "model=tiny-llama", "model.num_kv_heads=1"], 2, ["model.num_kv_heads=1", "whole KV heads"]),
    "ffn vs tp": (["parallel=tp2", "model.ffn_hidden_size=129"], 2, ["FFN size 129", "parallel.tensor=2"]),
    "layers vs pp": (["parallel=pp2", "model.num_layers=3"], 2, ["model.num_layers=3", "parallel.pipeline=2"]),
    "global batch": (["trainer.micro_batch_size=8", "trainer.global_batch_size=8", "trainer.grad_accum_steps=2"], 1,
                     ["trainer.global_batch_size=8", "micro_batch_size * trainer.grad_accum_steps * parallel.data"]),
    "global batch not a multiple": (["parallel=dp2_zero1", "trainer.micro_batch_size=8", "trainer.global_batch_size=8"], 2,
                                    ["not a multiple of trainer.micro_batch_size * parallel.data"]),
    "sequence vs positions": (["trainer.seq_length=512"], 1, ["trainer.seq_length=512", "model.max_position_embeddings=256"]),
    "zero2 with pp": (["parallel=pp2", "parallel.zero_stage=2"], 2, ["parallel.zero_stage=2", "pipeline engine"]),
    "zero3 with pp": (["parallel=pp2", "parallel.zero_stage=3"], 2, ["parallel.zero_stage=3", "zero_stage=1 or pipeline=1"]),
    "timeout": (["parallel.timeout_minutes=0"], 1, ["parallel.timeout_minutes=0", "must be positive"]),
    "bad precision": (["trainer.precision=fp16"], 1, ["trainer.precision='fp16'", "fp32, bf16"]),
    "bad norm": (["model.norm=batchnorm"], 1, ["model.norm='batchnorm'"]),
    "sp without tp": (["parallel.sequence_parallel=true"], 1, ["sequence_parallel=true needs parallel.tensor > 1"]),
}


@pytest.mark.parametrize("case", BAD)
def test_invalid_config_is_rejected_before_process_groups(case, monkeypatch):
    overrides, world, fragments = BAD[case]
    cfg = make("data=synthetic", *overrides)
    monkeypatch.setenv("WORLD_SIZE", str(world))

    def no_groups(*args, **kwargs):
        raise AssertionError("process groups were created before validation")

    monkeypatch.setattr(distributed, "init_distributed", no_groups)
    with pytest.raises(ConfigError) as err:
        Trainer(cfg, Path("unused")).run()
    for fragment in fragments:
        assert fragment in str(err.value), f"{case}: {fragment!r} not in {err.value}"


def test_several_problems_are_reported_together():
    cfg = make("data=synthetic", "parallel=pp2", "parallel.zero_stage=3", "model.num_layers=3")
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    assert len(err.value.problems) == 3


def test_unknown_preset_names_the_available_ones():
    with pytest.raises(MissingConfigException) as err:
        make("model=gpt5")
    assert "gpt5" in str(err.value)
    assert "gpt3-175b" in str(err.value) and "llama-7b" in str(err.value)


def test_command_line_reports_bad_config_and_exits_nonzero(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "data=synthetic", "parallel=tp2", f"hydra.run.dir={tmp_path}"],
        env=child_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "parallel.tensor * parallel.pipeline * parallel.data" in proc.stdout + proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_initial_weights_do_not_depend_on_the_layout():
    """The init draws each full tensor from (seed, canonical name): the layout never enters."""
    import torch

    from pretrain.model.init import init_full_tensor

    cfg = make("data=synthetic").model
    p = torch.nn.Parameter(torch.empty(8, 4))
    a = init_full_tensor("blocks.0.attn.qkv.weight", p, cfg, seed=3)
    assert torch.equal(a, init_full_tensor("blocks.0.attn.qkv.weight", p, cfg, seed=3))
    assert not torch.equal(a, init_full_tensor("blocks.1.attn.qkv.weight", p, cfg, seed=3))
    assert not torch.equal(a, init_full_tensor("blocks.0.attn.qkv.weight", p, cfg, seed=4))


@pytest.mark.parametrize("script, group_value", [("pretrain-train", "model=tiny-llama"), ("pretrain-data", "data=tiny")])
def test_console_scripts_find_the_config(script, group_value, tmp_path):
    """The installed entry points compose the same conf/ as `python -m` (Hydra's --cfg job prints it)."""
    exe = Path(sys.executable).parent / script
    proc = subprocess.run([str(exe), group_value, "--cfg", "job"], env=child_env(), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert group_value.split("=")[1] in proc.stdout
