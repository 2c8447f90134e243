"""The tokenize+write benchmark runs (its numbers are for an idle machine, in the issue notes)."""

import subprocess
import sys

from harness import REPO, child_env


def test_bench_tokenize_smoke():
    proc = subprocess.run([sys.executable, "-m", "pretrain.data.bench_tokenize", "--smoke", "--workers", "2"],
                          env=child_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split(":")[0].strip(): line for line in proc.stdout.splitlines() if ":" in line}
    for row in ("raw encode_batch", "pipeline tokenize+write", "ratio pipeline/raw", "pipeline MB/s per core"):
        assert row in lines, proc.stdout
    assert "2 processes / threads" in proc.stdout
