"""``python -m pretrain.bench.gpu``: its ``--smoke`` run on CPU (so the GPU benchmark never rots),
and the float64 check that decides whether a kernel's timings count."""

import json
import subprocess
import sys

import torch
from omegaconf import OmegaConf

from harness import child_env


def test_smoke_run_trains_every_variant_checks_the_kernels_and_writes_both_reports(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.bench.gpu", "--smoke", "--out", str(tmp_path / "out")],
                          env=child_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    assert report["passed"] and report["smoke"]
    runs = {(r["model"], r["variant"]): r for r in report["training"]}
    assert set(runs) == {("tiny-gpt", "eager"), ("tiny-gpt", "compiled"), ("tiny-gpt", "selective"),
                         ("tiny-llama", "eager")}
    for row in runs.values():
        assert row["passed"] and row["steps"] == 4 and row["tokens_per_s"] > 0 and row["peak_memory_gb"] > 0, row
    # The compiled and the selective runs really ran as such.
    logs = tmp_path / "out" / "gpu_bench_logs"
    assert "model.compile: 4 blocks compiled" in (logs / "tiny-gpt-compiled.log").read_text()
    saved = OmegaConf.load(tmp_path / "out" / "gpu_bench_runs" / "tiny-gpt-selective" / "config.yaml")
    assert saved.parallel.activation_checkpointing == "selective" and saved.trainer.precision == "bf16"
    kernels = report["kernels"]
    assert {c["case"] for c in kernels["attention_checks"]} == {"causal", "gqa", "window"}
    assert all(c["passed"] and 0 < c["triton_error"] < 0.05 for c in kernels["attention_checks"])
    assert {r["mode"] for r in kernels["attention"]} == {"fwd", "fwd_bwd"}
    assert [r["kernel"].split()[0] for r in kernels["norm_rope"]] == ["rms_norm", "rotary"]
    table = (tmp_path / "out" / "gpu_bench.md").read_text()
    for heading in ("## Training", "## Attention: float64 check", "## Attention TFLOP/s", "## RMSNorm and rotary"):
        assert heading in table


def test_a_kernel_that_misses_float64_fails_its_check(monkeypatch):
    from pretrain.bench import gpu_kernels

    case = gpu_kernels.SMOKE_CASES[1]  # GQA
    monkeypatch.setattr(gpu_kernels, "triton_attention", gpu_kernels.sdpa)
    honest = gpu_kernels.check_attention(case, 32, "cpu")
    assert honest["passed"] and honest["triton_error"] == honest["sdpa_error"]
    monkeypatch.setattr(gpu_kernels, "triton_attention", lambda q, k, v, w: gpu_kernels.sdpa(q, k, v, w) * 1.02)
    off = gpu_kernels.check_attention(case, 32, "cpu")
    assert not off["passed"] and off["triton_error"] > off["limit"], off


def test_a_failed_training_run_is_a_row_of_the_table_not_a_crash():
    from pretrain.bench.gpu import markdown

    failed = {"model": "llama-1.1b", "variant": "compiled", "passed": False, "error": "exit 1, 0 steps logged: OOM"}
    ok = {"model": "llama-1.1b", "variant": "eager", "passed": True, "tokens_per_s": 1e4, "model_tflops": 80.0,
          "mfu": 0.4, "peak_memory_gb": 40.0, "first_step_s": 3.0}
    table = markdown({"device": "GPU", "torch": torch.__version__, "triton": "3.6.0", "seconds": 1.0,
                      "training": [ok, failed]})
    assert "| llama-1.1b | compiled | failed: exit 1, 0 steps logged: OOM |" in table
    assert "| llama-1.1b | eager | 10,000 | 1.00x | 80.0 | 40.0% | 40.0 | 3.0 |" in table
