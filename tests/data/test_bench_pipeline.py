"""The whole-pipeline benchmark's --smoke (two tiny corpora) runs and reports what it measures."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_pipeline_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pretrain.data.bench_pipeline", "--smoke", "--json", str(out),
                        "--work", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "whole pipeline" in r.stdout and "MB/s per core" in r.stdout and "the smallest corpus's" in r.stdout
    runs = json.loads(out.read_text())["runs"]
    assert sorted(map(int, runs)) == [1_000_000, 2_000_000]
    for n, run in runs.items():
        assert abs(run["corpus_bytes"] - int(n)) / int(n) < 0.1
        # The job's own processes were sampled: a Python process with torch and tokenizers loaded
        # holds well over 100 MiB; PSS never exceeds RSS.
        assert run["peak_rss"] > 100 * 2**20 and 0 < run["peak_pss"] <= run["peak_rss"]
        assert {"clean", "dedup", "decontam", "tokenizer", "shards"} <= set(run["stages"])
        assert run["stages"]["clean"]["bytes_in"] > 0.8 * run["corpus_bytes"]
