"""A data job killed with SIGKILL, then run again: it completes, reuses the stages that had finished
and, within a stage, the tasks that had; and its outputs equal an uninterrupted run's, byte for byte.
Killed during deduplication's signatures and during tokenize+write (each one task per 100 kB chunk)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pretrain.data.synth_corpus import PlantConfig, generate

ROOT = Path(__file__).resolve().parents[2]
PLANTS = PlantConfig(exact_rate=0.03, near_rate=0.4, contam_rate=0.04, doc_words=(200, 1200), near_min_words=500)
JOB = """
import json, sys
from rich.console import Console
from pretrain.data import prepare_data
prepare_data(json.loads(sys.argv[1]), console=Console(stderr=True))
"""


def _config(corpus: Path, cache_dir: Path, eval_files) -> dict:
    return {
        "name": "killed", "cache_dir": str(cache_dir), "progress": False, "num_workers": 2, "task_bytes": 100_000,
        "sources": [{"name": "synth", "path": str(corpus / "part-*.jsonl"), "curated": True}],
        "eval_files": eval_files, "tokenizer": {"vocab_size": 512}, "split": "98,1,1",
    }


def _start(cfg: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", JOB, json.dumps(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def _stage_dirs(cache_dir: Path, stage: str):
    return sorted(p for p in (cache_dir / stage).glob("*") if (p / "manifest.json").is_file())


def _files(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "corpus"
    key = generate(out, 3_000_000, seed=21, shard_bytes=500_000, plants=PLANTS, log=lambda m: None)
    return out, key.eval_paths(out)


def _completions(cache_dir: Path, stage: str) -> list:
    return sorted((cache_dir / "_logs" / stage).glob("*/completions/*"))


@pytest.mark.parametrize("stage,tasks", [("dedup", "dedup-sig"), ("shards", "shards")])
def test_sigkill_then_rerun_equals_uninterrupted(corpus, tmp_path, stage, tasks):
    out, evals = corpus
    killed_cache, clean_cache = tmp_path / "killed", tmp_path / "uninterrupted"
    proc = _start(_config(out, killed_cache, evals))
    deadline = time.time() + 300
    while len(_completions(killed_cache, tasks)) < 2:  # some of the stage's tasks are done
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-4000:]
        time.sleep(0.02)
    children = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    # Killed inside the stage: the stages before it published, it and those after it not.
    assert not _stage_dirs(killed_cache, stage) and not _stage_dirs(killed_cache, "shards")
    (clean_dir,) = _stage_dirs(killed_cache, "clean")
    clean_manifest = (clean_dir / "manifest.json").stat().st_mtime_ns
    done = _completions(killed_cache, tasks)
    (logs,) = {p.parent.parent for p in done}
    ntasks = len(json.loads((killed_cache / tasks / f".{logs.name}.partial" / "plan.json").read_text())["units"])
    assert 2 <= len(done) < ntasks, (len(done), ntasks)
    done_logs = {p: p.stat().st_mtime_ns for p in (logs / "logs" / f"task_{c.name}.log" for c in done)}
    # No process of the job outlives it (the workers' pipes close; no manager server is left).
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]

    rerun = _finish(_start(_config(out, killed_cache, evals)))
    assert "data prepared" in rerun
    assert (clean_dir / "manifest.json").stat().st_mtime_ns == clean_manifest  # reused, not redone
    assert {p: p.stat().st_mtime_ns for p in done_logs} == done_logs  # finished tasks were not run again
    _finish(_start(_config(out, clean_cache, evals)))

    for name in ("clean", "dedup", "decontam", "tokenizer", "shards"):
        (a,), (b,) = _stage_dirs(killed_cache, name), _stage_dirs(clean_cache, name)
        assert a.name == b.name, name  # the same content key
        fa, fb = _files(a), _files(b)
        assert fa.keys() == fb.keys(), name
        for f in fa:
            if f.endswith(".json"):  # stage timings and rates differ; everything else must not
                ma, mb = (_without_timings(json.loads(x[f])) for x in (fa, fb))
                assert ma == mb, name
            else:
                assert fa[f] == fb[f], f"{name}/{f} differs"
    dedup_stats = json.loads((_stage_dirs(killed_cache, "dedup")[0] / "manifest.json").read_text())["stats"]
    assert dedup_stats["synth"]["docs_out"] < dedup_stats["synth"]["docs_in"]  # the planted duplicates went


def _without_timings(m):
    if isinstance(m, dict):
        return {k: _without_timings(v) for k, v in m.items() if k != "seconds" and not k.endswith("_per_s")}
    if isinstance(m, list):
        return [_without_timings(v) for v in m]
    return m
