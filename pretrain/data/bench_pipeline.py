"""Benchmark: the whole data pipeline on generated corpora; wall time, MB/s per core, peak memory.

For each size, a corpus from ``synth_corpus`` (planted duplicates and contamination; made once and
kept under ``--work``) goes through ``prepare_data`` in a child process with a cold cache, while this
process samples the memory of that process and all its children every 0.2 s: the peak of their
summed resident set (RSS) and of their summed proportional set (PSS: pages shared between the
forked workers counted once). Prints per-stage seconds and MB/s per core (from each stage's
``stats.json``), the whole pipeline's MB/s per core, and with two or more sizes the ratio of each
peak to the smallest size's, the figure that shows whether memory is bounded by configuration or
grows with the corpus.

    python -m pretrain.data.bench_pipeline --bytes 200M 2G [--workers 2] [--work DIR] [--json F]
    python -m pretrain.data.bench_pipeline --smoke     # 1 MB and 2 MB, small vocabulary (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

STAGES = ("clean", "quality", "dedup", "decontam", "tokenizer", "shards")
JOB = """
import json, sys
from rich.console import Console
from pretrain.data import prepare_data
prepare_data(json.loads(sys.argv[1]), console=Console(stderr=True))
"""


def _tree_memory(pid: int) -> tuple:
    """(summed RSS, summed PSS) in bytes of ``pid`` and its descendants; PSS falls back to RSS."""
    import psutil

    rss = pss = 0
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            full = p.memory_full_info()
            rss += full.rss
            pss += getattr(full, "pss", full.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, pss


class _Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_rss, self.peak_pss = pid, interval, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            rss, pss = _tree_memory(self.pid)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.stop.wait(self.interval)


def _corpus(work: Path, nbytes: int, seed: int) -> tuple:
    from pretrain.data.synth_corpus import Key, generate

    out = work / f"corpus-{nbytes}-{seed}"
    if not (out / "key.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        generate(out, nbytes, seed=seed, shard_bytes=min(64 << 20, max(nbytes // 8, 200_000)), log=lambda m: None)
        print(f"generated {nbytes / 1e6:,.0f} MB in {out} ({time.time() - t0:.0f}s)", file=sys.stderr)
    key = Key.load(out / "key.json")
    return out, key.eval_paths(out), key.bytes


def run_once(corpus: Path, evals: List[str], cache_dir: Path, workers: int, vocab: int, overrides: List[str] = ()) -> Dict:
    cfg = {
        "name": "bench", "cache_dir": str(cache_dir), "progress": False, "num_workers": workers,
        "sources": [{"name": "synth", "path": str(corpus / "part-*.jsonl"), "curated": True}],
        "eval_files": evals, "tokenizer": {"vocab_size": vocab}, "split": "98,1,1",
    }
    if overrides:  # data config keys, e.g. stages.clean.spans_in_memory=100000
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", JOB, json.dumps(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = _Sampler(proc.pid)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.time() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"bench_pipeline: the data job failed (exit {proc.returncode}):\n{out[-4000:]}")
    from pretrain.data.progress import read_stage_stats

    stages = {}
    for stage in STAGES:
        folders = sorted((cache_dir / stage).glob("*")) if (cache_dir / stage).is_dir() else []
        found = [s for s in (read_stage_stats(f) for f in folders) if s]
        if found:
            stages[stage] = {"seconds": sum(s["seconds"] for s in found), "bytes_in": sum(s["bytes_in"] for s in found)}
            if stage == "clean":  # the span pass's record: its size, and the runs it wrote to disk
                stages[stage]["span_record"] = {k: sum(s.get("span_record", {}).get(k, 0) for s in found)
                                                for k in ("spans", "runs_written")}
    return {"wall_s": wall, "peak_rss": sampler.peak_rss, "peak_pss": sampler.peak_pss, "stages": stages}


def main(argv=None) -> None:
    from pretrain.data.synth_corpus import parse_bytes

    ap = argparse.ArgumentParser(prog="bench_pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=parse_bytes, nargs="+", default=[parse_bytes("200M")], help="corpus sizes (200M 2G)")
    ap.add_argument("--workers", type=int, default=2, help="data.num_workers")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="keeps the generated corpora (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="data config overrides (dot keys)")
    ap.add_argument("--smoke", action="store_true", help="1 MB and 2 MB, vocabulary 512: that the benchmark runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.bytes, args.vocab = [1_000_000, 2_000_000], 512
    cores = len(os.sched_getaffinity(0))
    tmp = tempfile.mkdtemp(prefix="bench_pipeline-")
    work = Path(args.work or tmp)
    results = {}
    try:
        for n in sorted(args.bytes):
            corpus, evals, size = _corpus(work, n, args.seed)
            r = run_once(corpus, evals, Path(tmp) / f"cache-{n}", args.workers, args.vocab, args.set)
            r["corpus_bytes"] = size
            results[n] = r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print(results, cores, args.workers)
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "workers": args.workers, "runs": results}, indent=1))


def _print(results: Dict, cores: int, workers: int) -> None:
    print(f"{cores} cores, data.num_workers={workers}; MB/s per core = input MB / seconds / {cores}")
    base = results[min(results)]
    for n, r in sorted(results.items()):
        mb = r["corpus_bytes"] / 1e6
        print(f"\ncorpus {mb:,.1f} MB: wall {r['wall_s']:.1f}s, whole pipeline {mb / r['wall_s'] / cores:.3f} MB/s per core")
        print(f"  peak memory, all processes: RSS {r['peak_rss'] / 2**20:,.0f} MiB, PSS {r['peak_pss'] / 2**20:,.0f} MiB"
              + ("" if r is base else f" ({r['peak_rss'] / max(base['peak_rss'], 1):.2f}x and "
                                      f"{r['peak_pss'] / max(base['peak_pss'], 1):.2f}x the smallest corpus's)"))
        for stage, s in r["stages"].items():
            rate = s["bytes_in"] / 1e6 / max(s["seconds"], 1e-9) / cores
            print(f"  {stage:<10} {s['seconds']:8.1f}s" + (f"  {rate:8.3f} MB/s per core" if s["bytes_in"] else ""))
            if s.get("span_record", {}).get("spans"):
                rec = s["span_record"]
                print(f"  {'':<10} span record {rec['spans']:,} spans ({8 * rec['spans'] / 2**20:,.1f} MiB), "
                      f"{rec['runs_written']} runs written to disk")


if __name__ == "__main__":
    main()
