"""The step benchmark runs and reports both frameworks side by side (no timing assertions)."""

import re
import subprocess
import sys

import pytest

from harness import child_env


# tiny-gpt: ours compiled against transformers eager and compiled; tiny-llama: both eager only.
@pytest.mark.parametrize("model,extra", [("tiny-gpt", ["model.compile=true"]), ("tiny-llama", ["--no-hf-compile"])])
def test_step_benchmark_prints_every_rate_its_memory_and_the_ratios(model, extra, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.bench.step", "--steps", "3", "--warmup", "1", f"model={model}",
         "trainer.seq_length=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=4", *extra],
        env=child_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    names = ["pretrain", "transformers"] + ["transformers-compiled"] * ("--no-hf-compile" not in extra)
    for name in names:
        row = re.search(rf"^{name}\s+(\d+)\s+[\d.]+\s+[\d.]+%\s+([\d.]+)$", out, re.M)
        assert row and float(row.group(2)) > 0, out  # tokens/s ... and the memory of its step
        if name != "pretrain":
            assert re.search(rf"ratio pretrain / {name}: \d+\.\d+", out), out
    assert ("transformers-compiled" in out) == ("--no-hf-compile" not in extra), out
    assert f"model.compile={'True' if 'model.compile=true' in extra else 'None'}" in out, out
    assert "measured matmul peak" in out


def test_flops_formula_matches_a_hand_count():
    from hydra import compose, initialize_config_dir

    from harness import REPO
    from pretrain.config import register_configs
    from pretrain.flops import model_flops_per_token

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "pretrain" / "conf"), version_base="1.3"):
        gpt2 = compose("config", overrides=["model=gpt2-124m", "data=synthetic"]).model
        llama = compose("config", overrides=["model=llama-7b", "data=synthetic"]).model
    # GPT-2 124M: per layer 4h^2 (attention) + 8h^2 (MLP) = 12 * 768^2; LM head 50304 * 768.
    n = 12 * 12 * 768**2 + 50304 * 768
    assert model_flops_per_token(gpt2, 1024, 50304) == 6 * n + 12 * 12 * 768 * 1024
    # LLaMA-7B: attention 4 h^2, SwiGLU 3 * h * 11008, head 32000 * h.
    n = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 32000 * 4096
    assert model_flops_per_token(llama, 2048, 32000) == 6 * n + 12 * 32 * 4096 * 2048
