"""One-command GPU smoke test: install, bf16 vs fp32 training, compiled Triton kernels, one resume.

Wheels for an offline GPU machine (e.g. NVIDIA's PyTorch container, no network): the project's own
wheel and its dependencies from constraints.txt minus what the image brings (torch, Triton, nvidia-*,
and setuptools, which the image's torch pins; as the Dockerfile does). Build them on a machine with
network access and the GPU box's Python version and platform (best: the same container image)::

    grep -vE '^(torch|triton|nvidia-|setuptools)' constraints.txt > wheels.txt
    pip wheel --no-deps -w wheels/ .                  # pretrain-<version>-py3-none-any.whl
    pip download --no-deps -r wheels.txt -d wheels/   # the dependencies (--no-deps: never torch)
    pip wheel --no-deps -w wheels/ wheels/*.tar.gz    # sdist-only ones (DeepSpeed, antlr4-python3-runtime)

Carry wheels/, wheels.txt and the source checkout (for its tests/kernels) over; in the checkout's root::

    pip install --no-index --find-links wheels/ -c wheels.txt pretrain pytest
    python -m pretrain.bench.gpu_smoke --out smoke/

pip keeps the image's torch and Triton (pyproject pins neither; where the image sets PIP_CONSTRAINT, drop
its packages from wheels.txt first, as the Dockerfile does). Needs no network, corpus or tokenizer; under
6 minutes on one GPU. Prints a table, writes ``<out>/gpu_smoke.json``, logs in ``<out>/gpu_smoke_logs``.

Checks (a table row each; numbers and loss lists in the JSON). Exit status 0 when all pass, else 1.

1. install: python, torch, triton, deepspeed, megatron-core, transformers versions; CUDA, the device,
   CUDA/cuDNN/NCCL versions, bf16; apex and Transformer Engine present or not.
2. bf16_vs_fp32: 20 eager steps of gpt2-124m (vocabulary 50257, 8 x 1024 tokens a step, no dropout) through
   ``python -m pretrain.train`` (one process, NCCL) in bf16 and in fp32 on the same GPU: the per-step
   losses of the two metrics.jsonl agree to 1e-2 relative (and differ: bf16 really ran).
3. kernels: ``pytest tests/kernels`` compiled (TRITON_INTERPRET=0) against the tests' float64 references.
   The tests build CPU tensors, so this module is also a pytest plugin that runs their forced-Triton
   calls on CUDA copies (see pytest_configure); interpreter-only tests are deselected.
4. resume: a 10-step fp32 run (dropout on) stopped at step 5 (checkpoint.interval=5 stop_after=5) and
   continued in its run dir to step 10 matches an uninterrupted run: loss and grad norm to 1e-5, tokens
   and LR exactly, and the second part's log says it resumed at step 5.

``--dry-run``: the same code on CPU (CI): tiny-gpt, 4 bf16 vs 4 fp32 steps, resume 2 + 2, gloo,
DS_ACCELERATOR=cpu, three kernel tests in the Triton interpreter; under 3 minutes on two cores.
``--only bf16,resume`` runs a subset; ``--bf16-rtol`` / ``--resume-rtol`` change the limits.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

from pretrain.bench.children import REPO, child_env, run_logged
from pretrain.metrics import read_metrics

CHECKS = ("install", "bf16", "kernels", "resume")
BF16_LOSS_RTOL = 1e-2  # bf16 compute, fp32 masters, vs fp32 (tests/test_parity.py: 2e-2 across layouts)
RESUME_RTOL = 1e-5  # fp32 resume vs the uninterrupted run (tests/test_resume.py: 1e-6 on CPU)
PACKAGES = ("torch", "triton", "deepspeed", "megatron-core", "transformers", "pretrain")
COMMON = ["data=synthetic", "logging.wandb=false", "logging.plot=false", "trainer.progress_bar=false",
          "trainer.eval_interval=0", "checkpoint.save_final=false"]
NO_DROPOUT = ["model.hidden_dropout=0.0", "model.attention_dropout=0.0"]
# Kernel tests that cannot run compiled on a GPU as written: interpreter-only, or CPU tensors given
# straight to the custom ops (torch.ops.pretrain_kernels.*) with the Triton backend forced.
KERNEL_GPU_DESELECT = ("not (opcheck and triton) and not torch_compile_fullgraph"
                       " and not bench_smoke_run_under_interpreter and not model_with_triton_kernels")
KERNEL_DRY_RUN_TESTS = (  # one fast float64 comparison per kernel, in the interpreter
    "tests/kernels/test_kernels_attention.py::test_triton_matches_float64[(2, 1, 1, 33, 32)-w2-torch.float32]",
    "tests/kernels/test_kernels_rms_norm.py::test_matches_float64[triton-torch.float32-(2, 37, 64)]",
    "tests/kernels/test_kernels_rotary.py::test_matches_float64[triton-(2, 2, 2, 50, 32)-torch.float32]",
)
KERNELS_ON_CUDA = "PRETRAIN_GPU_SMOKE_KERNELS_ON_CUDA"  # turns on the pytest plugin below
RUNS, LOGS = "gpu_smoke_runs", "gpu_smoke_logs"  # under --out; emptied at start (stale checkpoints)


@dataclass(frozen=True)
class Plan:  # the GPU plan or the CPU dry-run plan
    dry_run: bool
    steps: int  # bf16 vs fp32
    resume_steps: int  # the uninterrupted run; the interrupted one stops at half
    train: tuple  # overrides of every training run
    timeout_s: int  # per training subprocess
    kernel_args: tuple
    kernel_timeout_s: int

    @staticmethod
    def make(dry_run: bool) -> "Plan":
        if dry_run:
            return Plan(True, 4, 4, ("model=tiny-gpt", "trainer=cpu", "trainer.seq_length=64", "trainer.micro_batch_size=4",
                                     "trainer.global_batch_size=4", "optim.lr=3e-3", "optim.warmup_tokens=256",
                                     "model.hidden_dropout=0.1"), 150, KERNEL_DRY_RUN_TESTS, 150)
        return Plan(False, 20, 10, ("model=gpt2-124m", "trainer=gpu", "trainer.seq_length=1024", "trainer.micro_batch_size=8",
                                    "trainer.global_batch_size=8", "data.tokenizer.vocab_size=50257", "optim.lr=6e-4",
                                    "optim.warmup_tokens=40960", "model.compile=false"), 300,  # bench.gpu times compile
                    ("tests/kernels", "-m", "", "-k", KERNEL_GPU_DESELECT), 420)  # -m "": the slow long sequences too


@dataclass
class Result:
    name: str
    passed: bool | None  # None: skipped
    numbers: dict
    seconds: float
    detail: str = ""
    result = property(lambda self: "skip" if self.passed is None else ("pass" if self.passed else "FAIL"))


def _tail(text: str, n: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:])


def train(name: str, overrides: list, out: Path, cuda: bool, timeout: int, log: str | None = None):
    """``python -m pretrain.train`` in run dir RUNS/NAME, output in LOGS/LOG.log; (status, output, records)."""
    run_dir, log_file = out / RUNS / name, out / LOGS / f"{log or name}.log"
    cmd = [sys.executable, "-m", "pretrain.train", *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    rc, text = run_logged(cmd, cuda, out, timeout, log_file)
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    return rc, text, [r for r in records if "loss" in r]


def rel_diffs(a: list, b: list) -> list:
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]


def _steps_problem(what: str, records: list, first: int, last: int) -> list:
    steps = [r["step"] for r in records]
    return [] if steps == list(range(first, last + 1)) else [f"{what} logged steps {steps}, not {first}..{last}"]


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def check_install(plan: Plan) -> Result:
    t0 = time.perf_counter()
    versions = {"python": platform.python_version(), **{pkg: _version(pkg) for pkg in PACKAGES}}
    n: dict = {"versions": versions, "cuda_available": False}
    problems = [f"{pkg} not installed" for pkg in PACKAGES[:-1] if versions[pkg] is None]
    try:
        import torch

        n["torch_cuda_build"], n["cuda_available"] = torch.version.cuda, torch.cuda.is_available()
        if n["cuda_available"]:
            n.update(device_count=torch.cuda.device_count(), device=torch.cuda.get_device_name(0),
                     capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                     bf16_supported=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
        try:
            nccl = torch.cuda.nccl.version()
            n["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception:  # noqa: BLE001 - CPU builds have no NCCL
            n["nccl"] = None
        n["dist_backend"] = "nccl" if n["cuda_available"] else "gloo"  # pretrain.engine.compat.dist_backend's rule
    except Exception as e:  # noqa: BLE001 - reported, not raised
        problems.append(f"import torch failed: {e}")
    n["apex"], n["transformer_engine"] = (util.find_spec(m) is not None for m in ("apex", "transformer_engine"))
    if not plan.dry_run:
        problems += (["CUDA is not available (use --dry-run on a CPU machine)"] if not n["cuda_available"] else
                     ["this GPU has no bf16"] * (not n.get("bf16_supported")) + ["torch has no NCCL"] * (not n.get("nccl")))
    detail = "; ".join(problems) or (
        f"{n.get('device', 'CUDA absent')}, torch {versions['torch']}, triton {versions['triton']}, CUDA "
        f"{n.get('torch_cuda_build')}, NCCL {n.get('nccl')}, apex {'yes' if n['apex'] else 'no'}, "
        f"TE {'yes' if n['transformer_engine'] else 'no'}")
    return Result("install", not problems, n, time.perf_counter() - t0, detail)


def check_bf16(plan: Plan, out: Path, cuda: bool, rtol: float) -> Result:
    t0, runs, problems = time.perf_counter(), {}, []
    for precision in ("bf16", "fp32"):
        rc, text, runs[precision] = train(precision, [*plan.train, *NO_DROPOUT, f"trainer.max_steps={plan.steps}",
                                                      f"trainer.precision={precision}"], out, cuda, plan.timeout_s)
        problems += ([f"{precision} run exited {rc}: {_tail(text)}"] if rc else
                     _steps_problem(f"{precision} run", runs[precision], 1, plan.steps))
        config = out / RUNS / precision / "config.yaml"
        if config.is_file() and f"precision: {precision}" not in config.read_text():
            problems.append(f"{precision} run's config.yaml does not say precision: {precision}")
    bf16, fp32 = ([r["loss"] for r in runs[p]] for p in ("bf16", "fp32"))
    diffs = rel_diffs(bf16, fp32) if not problems else []
    worst = max(diffs) if diffs else None
    if diffs:
        step = diffs.index(worst) + 1
        if not all(math.isfinite(x) for x in bf16 + fp32):
            problems.append("a loss is not finite")
        elif worst > rtol:
            problems.append(f"step {step}: bf16 loss {bf16[step - 1]:.6g} vs fp32 {fp32[step - 1]:.6g}, "
                            f"relative {worst:.2e} > {rtol:g}")
        elif worst == 0.0:
            problems.append("bf16 and fp32 losses are bit-identical: the bf16 run did not compute in bf16")
        if plan.steps >= 10 and not fp32[-1] < fp32[0]:  # a few CPU steps in warmup need not fall
            problems.append(f"the fp32 loss did not fall ({fp32[0]:.4g} -> {fp32[-1]:.4g})")
    per_run = {p: sorted(r.get("tokens_per_s") or 0 for r in runs[p][1:]) for p in runs}
    numbers = {"steps": plan.steps, "rtol": rtol, "max_rel_diff": worst, "bf16_losses": bf16, "fp32_losses": fp32,
               "median_tokens_per_s": {p: v[len(v) // 2] if v else None for p, v in per_run.items()},
               "peak_memory_gb": {p: max((r.get("peak_memory_gb") or 0 for r in runs[p]), default=None) for p in runs}}
    detail = "; ".join(problems) or (f"max rel {worst:.1e} <= {rtol:g} over {plan.steps} steps, "
                                     f"loss {fp32[0]:.3f} -> {fp32[-1]:.3f}")
    return Result("bf16_vs_fp32", not problems, numbers, time.perf_counter() - t0, detail)


def check_resume(plan: Plan, out: Path, cuda: bool, rtol: float) -> Result:
    t0, n, problems = time.perf_counter(), plan.resume_steps, []
    k = n // 2
    base = [*plan.train, f"trainer.max_steps={n}", "trainer.precision=fp32"]
    rc, text, full = train("resume-full", base, out, cuda, plan.timeout_s)
    problems += [f"uninterrupted run exited {rc}: {_tail(text)}"] if rc else _steps_problem("uninterrupted run", full, 1, n)
    interrupted = [*base, f"checkpoint.interval={k}"]
    rc, text, first = train("resume", [*interrupted, f"checkpoint.stop_after={k}"], out, cuda, plan.timeout_s, "resume-part1")
    problems += [f"first part exited {rc}: {_tail(text)}"] if rc else _steps_problem("first part", first, 1, k)
    checkpoints = sorted(p.name for p in (out / RUNS / "resume" / "checkpoints").glob("*"))
    rc, text, both = train("resume", interrupted, out, cuda, plan.timeout_s, "resume-part2")
    resumed = re.search(r"resumed from (\S+) at step (\d+)", text)
    rest = [r for r in both if r["step"] > k]
    if rc:
        problems.append(f"second part exited {rc}: {_tail(text)}")
    elif not resumed or int(resumed.group(2)) != k:
        problems.append(f"the second part did not resume at step {k} "
                        f"({'but at ' + resumed.group(2) if resumed else 'no resume in its log'})")
    else:
        problems += _steps_problem("second part", rest, k + 1, n)
    reference = full[k:]
    worst = None
    if not problems:
        worst = max(rel_diffs([r["loss"] for r in rest], [r["loss"] for r in reference])
                    + rel_diffs([r["grad_norm"] for r in rest], [r["grad_norm"] for r in reference]))
        problems += [f"step {a['step']}: tokens/lr {a['tokens']}/{a['lr']} vs {b['tokens']}/{b['lr']}"
                     for a, b in zip(rest, reference) if (a["tokens"], a["lr"]) != (b["tokens"], b["lr"])]
        if worst > rtol:
            problems.append(f"resumed steps differ from the uninterrupted run by {worst:.2e} > {rtol:g}")
        before = max(rel_diffs([r["loss"] for r in first], [r["loss"] for r in full[:k]]))
        if before > rtol:  # up to the stop the two are one run
            problems.append(f"steps 1-{k} of the interrupted run differ from the uninterrupted one by {before:.2e}")
    numbers = {"steps": n, "stopped_at": k, "rtol": rtol, "max_rel_diff": worst, "exact": worst == 0.0,
               "checkpoints_after_first_part": checkpoints, "resumed_from": resumed.group(1) if resumed else None,
               "resumed_losses": [r["loss"] for r in rest], "uninterrupted_losses": [r["loss"] for r in reference],
               "first_part_losses": [r["loss"] for r in first]}
    detail = "; ".join(problems) or f"steps {k + 1}-{n} after resume at {k}: max rel {worst:.1e} (loss, grad norm) <= {rtol:g}"
    return Result("resume", not problems, numbers, time.perf_counter() - t0, detail)


class KernelCheck:
    """``pytest tests/kernels`` in a subprocess, started first: it runs beside the training checks."""

    def __init__(self, plan: Plan, out: Path, cuda: bool):
        self.plan, self.cuda, self.t0, self.proc = plan, cuda, time.perf_counter(), None
        self.junit, self.log, self.tests = out / LOGS / "kernels-junit.xml", out / LOGS / "kernels.log", REPO / "tests" / "kernels"
        # compiled for the GPU (with the plugin below), the interpreter on CPU
        env = {**child_env(cuda), "TRITON_INTERPRET": "0" if cuda else "1", KERNELS_ON_CUDA: "1" if cuda else "0"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pretrain.bench.gpu_smoke",
               f"--basetemp={out / RUNS / 'kernels-tmp'}", f"--junitxml={self.junit}", *plan.kernel_args]
        if self.tests.is_dir():
            self._log = open(self.log, "w")
            print("$", *cmd, file=self._log, flush=True)
            self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def result(self) -> Result:
        if self.proc is None:
            return Result("kernels", False, {}, 0.0, f"{self.tests} not found: run from the source checkout")
        try:
            rc = self.proc.wait(timeout=max(1.0, self.plan.kernel_timeout_s - (time.perf_counter() - self.t0)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = 124
        seconds = time.perf_counter() - self.t0
        self._log.close()
        numbers = {"mode": "compiled (TRITON_INTERPRET=0)" if self.cuda else "interpreter (TRITON_INTERPRET=1)",
                   "exit_status": rc, "selection": list(self.plan.kernel_args)}
        if self.junit.is_file():
            suite = ET.parse(self.junit).getroot()
            suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
            numbers.update({key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")})
            numbers["passed"] = numbers["tests"] - numbers["failures"] - numbers["errors"] - numbers["skipped"]
            seconds = float(suite.get("time", seconds))  # pytest's own time, not until it was waited for
            numbers["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                       if c.find("failure") is not None or c.find("error") is not None][:20]
        passed = rc == 0 and numbers.get("passed", 0) > 0
        detail = (f"{numbers.get('passed')} passed, {numbers.get('skipped')} skipped against float64, "
                  f"{'compiled for the GPU' if self.cuda else 'Triton interpreter'}") if passed else (
            f"pytest exited {rc}{' (timed out)' if rc == 124 else ''}: {_tail(self.log.read_text(), 4)}")
        return Result("kernels", passed, numbers, seconds, detail)


def _to_cuda(t):
    import torch

    if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        return t
    if t.is_contiguous() or 0 in t.stride():
        return t.to("cuda")
    # A strided view stays strided (the non-contiguous q/k/v tests): same strides, its own storage.
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="cuda").copy_(t)


def _on_cuda(fn):
    """fn on CUDA copies of its CPU tensor arguments while the Triton backend is forced; results on CPU."""
    import torch
    from torch.utils._pytree import tree_map

    from pretrain_kernels import _backend

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if _backend.get_backend() != "triton" or not any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args):
            return fn(*args, **kwargs)
        result = fn(*map(_to_cuda, args), **{k: _to_cuda(v) for k, v in kwargs.items()})
        return tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, result)

    return wrapped


def pytest_configure(config):
    """The plugin (-p pretrain.bench.gpu_smoke, $PRETRAIN_GPU_SMOKE_KERNELS_ON_CUDA=1, a CUDA machine):
    the kernel tests' forced-Triton calls on their CPU tensors run compiled on the GPU."""
    import torch

    if os.environ.get(KERNELS_ON_CUDA) == "1" and torch.cuda.is_available():
        import pretrain_kernels as pk

        for name in ("causal_attention", "rms_norm", "apply_rotary"):
            setattr(pk, name, _on_cuda(getattr(pk, name)))


def table(results: list) -> str:
    rows = [("check", "result", "seconds", "numbers")] + [(r.name, r.result, f"{r.seconds:.1f}", r.detail) for r in results]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d}" for a, b, c, d in rows]
    return "\n".join([lines[0], "-" * (sum(w) + 6 + max(len(r[3]) for r in rows)), *lines[1:]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_smoke", help=f"output folder: gpu_smoke.json, {LOGS}/, {RUNS}/")
    parser.add_argument("--dry-run", action="store_true", help="the same checks on CPU: tiny model, few steps, interpreter")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--bf16-rtol", type=float, default=BF16_LOSS_RTOL, help="bf16 vs fp32 loss, relative")
    parser.add_argument("--resume-rtol", type=float, default=RESUME_RTOL, help="resumed vs uninterrupted, relative")
    args = parser.parse_args(argv)
    only = [c.strip() for c in args.only.split(",")]
    if sorted(set(only) - set(CHECKS)):
        parser.error(f"--only: unknown check(s) {sorted(set(only) - set(CHECKS))}; choose from {list(CHECKS)}")
    t0, out, plan = time.perf_counter(), Path(args.out).resolve(), Plan.make(args.dry_run)
    for folder in (RUNS, LOGS):  # a resume must not find an earlier invocation's checkpoints
        shutil.rmtree(out / folder, ignore_errors=True)
        (out / folder).mkdir(parents=True)
    print(f"gpu_smoke: {'dry run on CPU' if plan.dry_run else 'GPU'}; output in {out}", flush=True)
    install = check_install(plan)
    cuda = bool(install.numbers.get("cuda_available")) and not plan.dry_run
    runnable, skipped = plan.dry_run or cuda, "skipped: no CUDA (use --dry-run on a CPU machine)"
    kernels = KernelCheck(plan, out, cuda) if "kernels" in only and runnable else None
    results = [install] if "install" in only else []
    if "bf16" in only:
        results.append(check_bf16(plan, out, cuda, args.bf16_rtol) if runnable else Result("bf16_vs_fp32", None, {}, 0, skipped))
    if "resume" in only:
        results.append(check_resume(plan, out, cuda, args.resume_rtol) if runnable else Result("resume", None, {}, 0, skipped))
    if "kernels" in only:  # waited for last: it ran beside the training checks
        results.append(kernels.result() if kernels else Result("kernels", None, {}, 0, skipped))
    results.sort(key=lambda r: ("install", "bf16_vs_fp32", "kernels", "resume").index(r.name))
    passed, seconds = bool(results) and all(r.passed for r in results), time.perf_counter() - t0  # skip: no pass
    report = {"mode": "dry-run" if plan.dry_run else "gpu", "passed": passed, "seconds": round(seconds, 1),
              "command": [sys.executable, "-m", "pretrain.bench.gpu_smoke", *(sys.argv[1:] if argv is None else argv)],
              "checks": {r.name: {"result": r.result, "passed": r.passed, "seconds": round(r.seconds, 1),
                                  "detail": r.detail, "numbers": r.numbers} for r in results}}
    (out / "gpu_smoke.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{table(results)}\n{'PASS' if passed else 'FAIL'} in {seconds:.0f} s: {out / 'gpu_smoke.json'}, logs in {out / LOGS}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
