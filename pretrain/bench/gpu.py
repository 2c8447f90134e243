"""GPU benchmark: single-GPU bf16 training throughput, and the Triton kernels against PyTorch.

    python -m pretrain.bench.gpu --out bench/            # one H100 or H200, no network, under 8 minutes
    python -m pretrain.bench.gpu --smoke --out /tmp/b    # the same code on CPU, tiny shapes (CI)

Needs torch and Triton (the image's own: any torch 2.11-2.13 with the Triton it ships) and this
project's wheel with its dependencies, carried as wheels to an offline machine exactly as
``pretrain/bench/gpu_smoke.py`` describes (constraints.txt minus torch, Triton, nvidia-* and
setuptools). No corpus, tokenizer or network: the training runs use synthetic tokens.

1. training: ``python -m pretrain.train`` (one process, NCCL), bf16 with fp32 master weights, no
   gradient accumulation, for gpt2-124m (sequence 1024, micro-batch 8) and a 1.1B LLaMA (TinyLlama's
   shape: 22 layers, hidden 2048, 32 heads, 4 KV heads, FFN 5632, vocabulary 32000; sequence 2048,
   micro-batch 4), each eager, compiled (``model.compile=true``) and with selective recomputation
   (``parallel.activation_checkpointing=selective``). Tokens/s, model TFLOP/s and MFU (the trainer's
   own: 6N + attention FLOPs per token against the device's dense bf16 peak) and peak allocated
   memory: medians over the steps after the first ``warmup`` (compilation, allocator growth).
2. kernels (``pretrain/bench/gpu_kernels.py``): Triton attention vs SDPA at sequence 1k-8k (causal,
   GQA, local window), forward and forward+backward TFLOP/s, after a float64 correctness check of
   both; RMSNorm and rotary GB/s vs PyTorch, with the same check.

Writes ``<out>/gpu_bench.json`` and ``<out>/gpu_bench.md`` (the tables), run logs in
``<out>/gpu_bench_logs``. Exit status 1 when a run failed or a kernel missed its float64 check.
``--only training`` or ``--only kernels`` runs one half; ``--timeout`` bounds each training run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pretrain.bench.children import run_logged
from pretrain.bench.gpu_smoke import COMMON, NO_DROPOUT
from pretrain.metrics import read_metrics

PARTS = ("training", "kernels")
VARIANTS = {"eager": ["model.compile=false"], "compiled": ["model.compile=true"],
            "selective": ["model.compile=false", "parallel.activation_checkpointing=selective"]}
RUNS, LOGS = "gpu_bench_runs", "gpu_bench_logs"


@dataclass(frozen=True)
class Shape:
    name: str
    overrides: tuple
    steps: int
    warmup: int  # leading steps left out of the medians
    variants: tuple = tuple(VARIANTS)


GPU_SHAPES = (
    Shape("gpt2-124m", ("model=gpt2-124m", "trainer=gpu", "trainer.seq_length=1024", "trainer.micro_batch_size=8",
                        "trainer.global_batch_size=8", "data.tokenizer.vocab_size=50257"), 30, 10),
    Shape("llama-1.1b", ("model=llama-7b", "model.name=llama-1.1b", "model.num_layers=22", "model.hidden_size=2048",
                         "model.num_attention_heads=32", "model.num_kv_heads=4", "model.ffn_hidden_size=5632",
                         "optim=llama", "trainer=gpu", "trainer.seq_length=2048", "trainer.micro_batch_size=4",
                         "trainer.global_batch_size=4", "data.tokenizer.vocab_size=32000"), 20, 8),
)
SMOKE_SHAPES = (
    Shape("tiny-gpt", ("model=tiny-gpt", "trainer=cpu", "trainer.seq_length=64", "trainer.micro_batch_size=4",
                       "trainer.global_batch_size=4"), 4, 2),
    Shape("tiny-llama", ("model=tiny-llama", "trainer=cpu", "trainer.seq_length=64", "trainer.micro_batch_size=4",
                         "trainer.global_batch_size=4"), 4, 2, ("eager",)),  # the LLaMA shape's path; CI's time
)


def train(shape: Shape, variant: str, out: Path, cuda: bool, timeout: int) -> dict:
    """One training run; its medians, or its failure with the log's tail."""
    name = f"{shape.name}-{variant}"
    run_dir, log = out / RUNS / name, out / LOGS / f"{name}.log"
    precision = "trainer.precision=bf16"
    cmd = [sys.executable, "-m", "pretrain.train", *COMMON, *NO_DROPOUT, *shape.overrides, *VARIANTS[variant],
           precision, f"trainer.max_steps={shape.steps}", "optim.warmup_tokens=0", f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    rc, text = run_logged(cmd, cuda, out, timeout, log)
    records = [r for r in read_metrics(run_dir) if "tokens_per_s" in r] if (run_dir / "metrics.jsonl").is_file() else []
    row = {"model": shape.name, "variant": variant, "seconds": round(time.perf_counter() - t0, 1), "returncode": rc,
           "steps": len(records)}
    timed = records[shape.warmup:]
    if rc != 0 or not timed:
        tail = " | ".join(line.strip() for line in text.strip().splitlines()[-4:])
        return {**row, "passed": False, "error": f"exit {rc}, {len(records)} steps logged: {tail}"}
    median = lambda key: statistics.median(r[key] for r in timed)  # noqa: E731
    return {**row, "passed": True, "tokens_per_s": median("tokens_per_s"), "model_tflops": median("model_tflops_per_s"),
            "mfu": median("mfu"), "peak_memory_gb": max(r["peak_memory_gb"] for r in timed),
            "first_step_s": records[0]["step_time_s"], "final_loss": records[-1]["loss"]}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    lines = [f"# GPU benchmark: {report['device']}", "", f"torch {report['torch']}, Triton {report['triton']}; "
             f"{report['seconds']:.0f} s in all.", ""]
    if report.get("training"):
        lines += [f"## Training, bf16, one process on {report['device']}", "",
                  "| model | variant | tokens/s | vs eager | model TFLOP/s | MFU | peak GiB | first step s |",
                  "|---|---|---|---|---|---|---|---|"]
        eager = {r["model"]: r.get("tokens_per_s") for r in report["training"] if r["variant"] == "eager"}
        for r in report["training"]:
            if not r["passed"]:
                lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error'][:120]} | | | | | |")
                continue
            ratio = r["tokens_per_s"] / eager[r["model"]] if eager.get(r["model"]) else None
            lines.append(f"| {r['model']} | {r['variant']} | {r['tokens_per_s']:,.0f} | {_fmt(ratio, '.2f')}x | "
                         f"{r['model_tflops']:.1f} | {r['mfu']:.1%} | {r['peak_memory_gb']:.1f} | {r['first_step_s']:.1f} |")
    kernels = report.get("kernels")
    if kernels:
        lines += ["", "## Attention: float64 check (bf16, relative max error over out, dq, dk, dv)", "",
                  "| case | seq | triton | sdpa | limit | pass |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['case']} | {c['seq']} | {c['triton_error']:.2e} | {c['sdpa_error']:.2e} | {c['limit']:.2e} | "
                  f"{'yes' if c['passed'] else 'NO'} |" for c in kernels["attention_checks"]]
        lines += ["", "## Attention TFLOP/s (visible pairs only)", "",
                  "| case | seq | batch | mode | sdpa | triton | triton / sdpa |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['seq']} | {r['batch']} | {r['mode']} | {_fmt(r['sdpa_tflops'], '.1f')} | "
                  f"{_fmt(r['triton_tflops'], '.1f')} | {_fmt(r['triton_vs_sdpa'], '.2f')}x |" for r in kernels["attention"]]
        lines += ["", "## RMSNorm and rotary (GB/s of the minimum traffic)", "",
                  "| kernel | triton GB/s | torch GB/s | triton / torch | float64 check |", "|---|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['triton_gbps']:.1f} | {r['torch_gbps']:.1f} | {r['triton_vs_torch']:.2f}x | "
                  f"{'pass' if r['passed'] else 'FAIL'} ({r['triton_error']:.1e} vs torch {r['torch_error']:.1e}) |"
                  for r in kernels["norm_rope"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_bench", help="output folder")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter); timings mean nothing")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per training run")
    args = parser.parse_args(argv)
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    if not only or set(only) - set(PARTS):
        parser.error(f"--only: choose from {list(PARTS)} (got {args.only!r})")
    if args.smoke:  # before anything imports Triton: the kernels bind to the interpreter at import
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        parser.error(f"no CUDA GPU here (torch {torch.__version__}); --smoke runs the same code on CPU")
    t0, out = time.perf_counter(), Path(args.out).resolve()
    for folder in (RUNS, LOGS):
        shutil.rmtree(out / folder, ignore_errors=True)
        (out / folder).mkdir(parents=True)
    report = {"device": torch.cuda.get_device_name() if cuda else "CPU (smoke: timings mean nothing)",
              "torch": torch.__version__, "triton": _version("triton"), "smoke": args.smoke}
    if "training" in only:
        report["training"] = []
        for shape in SMOKE_SHAPES if args.smoke else GPU_SHAPES:
            for variant in shape.variants:
                row = train(shape, variant, out, cuda, args.timeout)
                print(f"training {shape.name} {variant}: " + (f"{row['tokens_per_s']:,.0f} tokens/s, MFU {row['mfu']:.1%}, "
                      f"{row['peak_memory_gb']:.1f} GiB" if row["passed"] else row["error"]), flush=True)
                report["training"].append(row)
    if "kernels" in only:
        from pretrain.bench import gpu_kernels

        report["kernels"] = gpu_kernels.run("cuda" if cuda else "cpu", args.smoke)
    report["seconds"] = time.perf_counter() - t0
    rows = report.get("training", []) + [r for part in report.get("kernels", {}).values() for r in part if "passed" in r]
    report["passed"] = all(r["passed"] for r in rows)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_bench.md").write_text(markdown(report))
    print(markdown(report) + f"\n{'PASS' if report['passed'] else 'FAIL'}: {out / 'gpu_bench.json'}, {out / 'gpu_bench.md'}")
    return 0 if report["passed"] else 1


def _version(pkg: str):
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
