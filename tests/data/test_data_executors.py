"""data.executor = local, slurm and ray: one generated corpus gives byte-identical shards, tokenizer
and mixture report on each. Slurm is the real single-node slurm-wlm the tests start (array jobs, two
tasks at a time); Ray is a local head started here with ``ray start``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO, child_env, free_port, http_server
from pretrain.data.synth_corpus import PlantConfig, generate

pytestmark = pytest.mark.distributed

PLANTS = PlantConfig(exact_rate=0.03, near_rate=0.3, contam_rate=0.04, doc_words=(200, 900), near_min_words=500)
JOB = """
import json, sys
from rich.console import Console
from pretrain.data import prepare_data
p = prepare_data(json.loads(sys.argv[1]), console=Console(stderr=True))
print("SHARDS", p.shard_dir)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "corpus"
    key = generate(out, 700_000, seed=5, shard_bytes=250_000, plants=PLANTS, log=lambda m: None)
    return out, key.eval_paths(out)


def _config(corpus, cache_dir: Path, executor: str, base: str | None = None, **extra) -> dict:
    """``base``: where the corpus files are read from (default: the local folder)."""
    out, evals = corpus
    base = base or str(out)
    return {
        "name": "executors", "cache_dir": str(cache_dir), "progress": False, "num_workers": 2, "task_bytes": 150_000,
        "executor": executor, "eval_files": evals, "tokenizer": {"vocab_size": 512}, "split": "90,5,5",
        "sources": [{"name": "web", "path": f"{base}/part-0000[01].jsonl", "curated": True},
                    {"name": "more", "path": f"{base}/part-0000[2-9].jsonl", "curated": True}],
        **extra,
    }


def _prepare(cfg: dict, env: dict | None = None) -> Path:
    proc = subprocess.run([sys.executable, "-c", JOB, json.dumps(cfg)], cwd=REPO, env={**child_env(), **(env or {})},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("SHARDS ")]
    return Path(line.split(" ", 1)[1])


def _outputs(shard_dir: Path) -> dict:
    """Shards, the mixture report and the tokenizer, byte for byte; the shard manifest without timings."""
    root = shard_dir.parents[1]
    files = {p.name: p.read_bytes() for p in sorted(shard_dir.iterdir()) if p.suffix in (".bin", ".idx")}
    files["mixture_report.json"] = (shard_dir / "mixture_report.json").read_bytes()
    (tok,) = (root / "tokenizer").glob("*/tokenizer.json")
    files["tokenizer.json"] = tok.read_bytes()
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    files["manifest"] = json.dumps({k: v for k, v in manifest.items() if k != "stats"}, sort_keys=True)
    return files


@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory):
    return _outputs(_prepare(_config(corpus, tmp_path_factory.mktemp("local"), "local")))


def test_local_uses_several_tasks_per_chunked_stage(local, corpus, tmp_path):
    assert {"web.bin", "web.idx", "more.bin", "more.idx"} <= set(local)
    shard_dir = _prepare(_config(corpus, tmp_path, "local"))
    logs = shard_dir.parents[1] / "_logs"
    for stage in ("decontam", "shards"):
        (job,) = (logs / stage).iterdir()
        assert len(list((job / "completions").iterdir())) >= 4, stage  # ~700 kB in 150 kB chunks
    assert _outputs(shard_dir) == local  # the same again


def _slurm(**extra) -> dict:
    return {"cluster": "local-cpu", "overrides": [f"python={sys.executable}", f"workdir={REPO}"],
            "cpus_per_task": 1, "max_parallel": 2, "poll_seconds": 0.5, **extra}


@pytest.mark.parametrize("chain", [True, False], ids=["chained-jobs", "driver-waits"])
def test_slurm_executor_gives_identical_outputs(slurm, local, corpus, tmp_path, chain):
    cfg = _config(corpus, tmp_path / "cache", "slurm", slurm=_slurm(chain=chain))
    shard_dir = _prepare(cfg, env=slurm)
    assert _outputs(shard_dir) == local
    logs = tmp_path / "cache" / "_logs"
    scripts = list(logs.glob("*/*/slurm/stage.sbatch"))
    assert {p.parts[-4] for p in scripts} >= {"clean-files", "clean", "dedup", "decontam", "tokenizer", "shards"}
    text = next(p for p in scripts if p.parts[-4] == "shards").read_text()
    assert "#SBATCH --array=0," in text and "%2" in text and "-m pretrain.data.run_task" in text
    # Each array task logged through datatrove and left its completion marker.
    (job,) = (logs / "shards").iterdir()
    assert len(list((job / "completions").iterdir())) == len(list((job / "logs").glob("task_*.log"))) >= 4
    if not chain:
        assert not (logs / "chain").exists()
        return
    # The driver ran as Slurm jobs: after each stage's array job, a step that depends on it.
    (folder,) = (logs / "chain").iterdir()
    jobs = [json.loads(x) for x in (folder / "jobs.jsonl").read_text().splitlines()]
    steps, arrays = [j for j in jobs if j["kind"] == "step"], [j["job"] for j in jobs if j["kind"] == "array"]
    assert steps[0]["after"] is None and [s["after"] for s in steps[1:]] == arrays and len(arrays) == len(scripts)
    for k, step in enumerate(steps[1:], 1):
        text = (folder / f"step-{k:03d}.sbatch").read_text()
        assert f"#SBATCH --dependency=afterany:{step['after']}" in text and "-m pretrain.data.slurm_chain" in text
    assert len(list(folder.glob("*.out"))) == len(steps)  # each step's log


def test_an_error_in_a_slurm_chain_step_reaches_the_caller(slurm, corpus, tmp_path):
    """A stage's check fails in a driver step (a Slurm job): the caller raises the same named error."""
    cfg = _config(corpus, tmp_path / "cache", "slurm", slurm=_slurm())
    cfg["stages"] = {"clean": {"min_chars": 10**7}}  # every document is too short
    proc = subprocess.run([sys.executable, "-c", JOB, json.dumps(cfg)], cwd=REPO, env={**child_env(), **slurm},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "DataConfigError" in proc.stderr and "have no documents left after clean" in proc.stderr, proc.stderr[-3000:]
    (folder,) = (tmp_path / "cache" / "_logs" / "chain").iterdir()
    assert "no documents left after clean" in json.loads((folder / "error.json").read_text())["message"]


def test_a_live_job_is_seen_beside_one_slurm_has_forgotten(slurm, monkeypatch):
    """The caller asks whether the chain's last jobs are queued; a job Slurm has already forgotten
    (past MinJobAge) must not hide a live one beside it."""
    from pretrain.data import slurm_jobs

    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    live = subprocess.run(["sbatch", "--parsable", "--wrap", "sleep 60"], env=slurm, capture_output=True,
                          text=True, check=True).stdout.strip().split(";")[0]
    try:
        assert slurm_jobs.queued(["99999999", live]) and slurm_jobs.queued([live, "99999999"])
        assert not slurm_jobs.queued(["99999999"])
    finally:
        subprocess.run(["scancel", live], env=slurm, check=False)


@pytest.mark.parametrize("ranges", [False, True], ids=["whole-files", "byte-ranges"])
def test_sources_over_http_give_identical_outputs(local, corpus, tmp_path, ranges):
    """The same files read through fsspec (an HTTP server on loopback), in the worker processes.
    A server that serves byte ranges lets read + clean cut each file into parts, as the local run
    does (two per 250 kB file); one that does not has each file read whole (the one-file source in one task)."""
    with http_server(corpus[0], ranges=ranges) as url:
        shard_dir = _prepare(_config(corpus, tmp_path, "local", base=url))
    got, want = _outputs(shard_dir), dict(local)
    keys = [json.loads(m).pop("tokenizer_key") for m in (got.pop("manifest"), want.pop("manifest"))]
    assert keys[0] != keys[1]  # the cache knows the inputs by URL: a key of its own
    assert got == want
    (job,) = (tmp_path / "_logs" / "clean-files").iterdir()
    assert len(list((job / "completions").iterdir())) == (6 if ranges else 2)  # 3 files (2 in web, 1 in more)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    ray = Path(sys.executable).parent / "ray"
    port = free_port()
    # A cluster on loopback for one test: no token authentication (ray start enables it by default).
    env = {**child_env(), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    temp = tmp_path_factory.mktemp("ray")
    start = subprocess.run([str(ray), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                            f"--temp-dir={temp}", "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, f"cannot start a local Ray head: {start.stdout[-2000:]}{start.stderr[-2000:]}"
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([str(ray), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_executor_gives_identical_outputs(ray_head, local, corpus, tmp_path):
    address, env = ray_head
    shard_dir = _prepare(_config(corpus, tmp_path, "ray", ray={"address": address, "mem_per_cpu_gb": 0.5}), env=env)
    assert _outputs(shard_dir) == local
    (job,) = (tmp_path / "_logs" / "shards").iterdir()
    assert len(list((job / "completions").iterdir())) >= 4


def test_a_bad_record_in_a_pool_task_is_a_named_error(corpus, tmp_path):
    """Two sources read in two worker processes; the bad line's file and number reach the user."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine enough"}\n{"text": 3}\n')
    cfg = _config(corpus, tmp_path / "cache", "local")
    cfg["sources"][1] = {"name": "bad", "path": str(bad), "curated": True}
    proc = subprocess.run([sys.executable, "-c", JOB, json.dumps(cfg)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "DataConfigError" in proc.stderr and "bad.jsonl line 2" in proc.stderr, proc.stderr[-3000:]
    # Raised by the driver from the task's result: no worker traceback before it.
    assert proc.stderr.count("Traceback") == 1 and "_run_for_rank" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("over, message", [
    ({"executor": "spark"}, "data.executor='spark': choose one of local|slurm|ray"),
    ({"executor": "slurm", "slurm": {"cluster": "nowhere"}}, "data.slurm.cluster='nowhere'"),
    ({"executor": "ray", "ray": {"cpus_per_task": 0}}, "data.ray.cpus_per_task=0: must be at least 1"),
    ({"task_bytes": 10}, "data.task_bytes=10: must be at least 100000"),
])
def test_bad_executor_settings_are_named_before_any_work(corpus, tmp_path, over, message):
    from pretrain.data import DataConfigError, validate_data_config

    with pytest.raises(DataConfigError) as e:
        validate_data_config({**_config(corpus, tmp_path, "local"), **over})
    assert message in str(e.value)
    assert not (tmp_path / "clean").exists()
