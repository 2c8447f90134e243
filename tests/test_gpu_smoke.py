"""`python -m pretrain.bench.gpu_smoke --dry-run`: the GPU smoke test's own code path on CPU, so it never rots.

One full dry run (tiny-gpt, 4 bf16 vs 4 fp32 steps, resume 2 + 2, three kernel tests in the Triton
interpreter), and one run whose bf16 limit is 0, which must fail with exit status 1.
"""

import json
import subprocess
import sys

import pytest

from harness import REPO, child_env

CHECKS = ("install", "bf16_vs_fp32", "kernels", "resume")


def _smoke(out, *args, timeout=300):
    cmd = [sys.executable, "-m", "pretrain.bench.gpu_smoke", "--dry-run", "--out", str(out), *args]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    report = out / "gpu_smoke.json"
    return proc, (json.loads(report.read_text()) if report.is_file() else None)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    return out, *_smoke(out)


def test_dry_run_passes_every_check(dry_run):
    out, proc, report = dry_run
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert report["mode"] == "dry-run" and report["passed"] is True
    assert sorted(report["checks"]) == sorted(CHECKS)
    for name, check in report["checks"].items():
        assert check["result"] == "pass" and check["passed"] is True, (name, check["detail"])
        assert check["numbers"] and check["seconds"] >= 0, name
        assert name in proc.stdout  # the table
    assert "PASS" in proc.stdout


def test_install_check_reports_versions_and_no_cuda(dry_run):
    numbers = dry_run[2]["checks"]["install"]["numbers"]
    for pkg in ("python", "torch", "triton", "deepspeed", "megatron-core", "transformers"):
        assert numbers["versions"][pkg], pkg
    assert numbers["cuda_available"] is False and numbers["dist_backend"] == "gloo"
    assert isinstance(numbers["apex"], bool) and isinstance(numbers["transformer_engine"], bool)


def test_bf16_and_fp32_really_ran_and_were_compared(dry_run):
    out, _, report = dry_run
    numbers = report["checks"]["bf16_vs_fp32"]["numbers"]
    bf16, fp32 = numbers["bf16_losses"], numbers["fp32_losses"]
    assert len(bf16) == len(fp32) == numbers["steps"] == 4
    assert bf16 != fp32, "the bf16 run must differ from the fp32 run somewhere"
    worst = max(abs(a - b) / abs(b) for a, b in zip(bf16, fp32))
    assert numbers["max_rel_diff"] == pytest.approx(worst) and 0 < worst <= numbers["rtol"] == 1e-2
    for precision, losses in (("bf16", bf16), ("fp32", fp32)):  # the lists are the runs' own metrics
        records = [json.loads(line) for line in (out / "gpu_smoke_runs" / precision / "metrics.jsonl").read_text().splitlines()]
        assert [r["loss"] for r in records] == losses
        assert f"precision: {precision}" in (out / "gpu_smoke_runs" / precision / "config.yaml").read_text()


def test_resume_continued_from_the_checkpoint(dry_run):
    numbers = dry_run[2]["checks"]["resume"]["numbers"]
    assert (numbers["steps"], numbers["stopped_at"]) == (4, 2)
    assert numbers["resumed_from"] and any(name.startswith("step") for name in numbers["checkpoints_after_first_part"])
    resumed, uninterrupted = numbers["resumed_losses"], numbers["uninterrupted_losses"]
    assert len(resumed) == len(uninterrupted) == 2 and len(numbers["first_part_losses"]) == 2
    assert len(set(uninterrupted + numbers["first_part_losses"])) == 4  # training moved: the comparison can fail
    assert max(abs(a - b) / abs(b) for a, b in zip(resumed, uninterrupted)) <= numbers["rtol"] == 1e-5


def test_kernel_check_ran_the_interpreter(dry_run):
    numbers = dry_run[2]["checks"]["kernels"]["numbers"]
    assert numbers["mode"].startswith("interpreter") and numbers["exit_status"] == 0
    assert numbers["passed"] == numbers["tests"] == 3 and numbers["failures"] == numbers["errors"] == 0


def test_a_failing_check_exits_1(tmp_path):
    proc, report = _smoke(tmp_path, "--only", "bf16", "--bf16-rtol", "0")
    assert proc.returncode == 1, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert report["passed"] is False and list(report["checks"]) == ["bf16_vs_fp32"]
    check = report["checks"]["bf16_vs_fp32"]
    assert check["result"] == "FAIL" and "> 0" in check["detail"]
    assert "FAIL" in proc.stdout
