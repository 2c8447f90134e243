"""Shared helpers for the top-level tests: launching training jobs in subprocesses."""

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Small, fast jobs: no plots, no progress bars, nothing downloaded.
FAST = [
    "trainer.progress_bar=false",
    "logging.plot=false",
    "trainer.eval_interval=0",
    "checkpoint.save_final=false",
    "logging.wandb=false",
]


# Process-group coordinates: a one-process group created in the test process (generate, Trainer.run)
# writes them into os.environ; a child job must never inherit them (see conftest.py).
GROUP_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                   "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def child_env() -> dict:
    """This environment for a child job, less the process-group coordinates this process may hold."""
    env = {k: v for k, v in os.environ.items() if k not in GROUP_VARIABLES}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_jobs(nproc: int, jobs: dict, workdir: Path, timeout: int = 900, env: dict | None = None) -> dict:
    """Run jobs {name: overrides} in one torchrun launch of nproc processes; {name: metrics records}."""
    workdir.mkdir(parents=True, exist_ok=True)
    jobs_file = workdir / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    out = workdir / "results.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO / "tests" / "parity_worker.py"), str(out), str(jobs_file), str(workdir),
    ]
    proc = subprocess.run(cmd, env={**child_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout, cwd=workdir)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def run_train(args: list, cwd: Path, nproc: int = 1, timeout: int = 900, check: bool = True, env: dict | None = None):
    """`python -m pretrain.train ARGS` (under torchrun when nproc > 1)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "pretrain.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pretrain.train", *args]
    proc = subprocess.run(cmd, env={**child_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def free_port() -> int:
    """A TCP port nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_server(directory: Path, ranges: bool = False):
    """Serve ``directory`` over HTTP on loopback (Python's http.server, with folder listings; with
    ``ranges``, byte ranges too: tests/range_http.py); yields its base URL."""
    port = free_port()
    serve = [str(Path(__file__).parent / "range_http.py"), str(port), str(directory)] if ranges else \
        ["-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(directory)]
    proc = subprocess.Popen([sys.executable, *serve], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "http.server did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def two_ranks(measure, out_dir: Path) -> dict:
    """Run ``measure(rank, port, out_dir)`` in two spawned processes (each joins a gloo group on the
    port) and return the ``saved.json`` rank 0 writes into ``out_dir``."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(measure, args=(free_port(), str(out_dir)), nprocs=2, start_method="spawn")
    return json.loads((Path(out_dir) / "saved.json").read_text())


def series(records: list, key: str) -> list:
    return [r[key] for r in records]


def assert_close(got: list, want: list, rtol: float, what: str) -> None:
    """Step by step, |got - want| <= rtol |want|, every value finite."""
    assert len(got) == len(want), f"{what}: {len(got)} steps vs {len(want)}"
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert math.isfinite(g), f"{what} step {step}: {g}"
        assert abs(g - w) <= rtol * abs(w), f"{what} step {step}: {g} vs reference {w} (rel {abs(g - w) / abs(w):.2e})"
