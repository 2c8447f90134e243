"""Benchmark: tokenize+write (the pipeline's shard stage) vs raw ``tokenizers`` ``encode_batch``.

Same text, same tokenizer, same number of processes: the pipeline's N worker processes against
``encode_batch`` in this process with N tokenizer threads (``RAYON_NUM_THREADS``, set before the
tokenizer's thread pool starts). Prints tokens/s of both, alternating runs, and the ratio; the
pipeline's overhead over raw encoding should stay under 20%. The pipeline here is the tokenize+write
stage itself: its tasks (one per chunk of the input) on the local executor's N worker processes,
then the per-source concatenation. Its first run also starts the executor's process server; it is
reported apart.

    python -m pretrain.data.bench_tokenize [--mb 8] [--vocab 8192] [--repeats 3] [--workers N]
    python -m pretrain.data.bench_tokenize --smoke     # 0.2 MB, one run (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def _corpus(mb: float):
    """About ``mb`` MB of built-in text, taken evenly from every installed source."""
    from pretrain.data.corpus import BUILTINS, CorpusNotInstalled

    sources = []
    for c in BUILTINS.values():
        try:
            c.files()
            sources.append(c)
        except CorpusNotInstalled:
            pass
    per = mb * 1e6 / len(sources)
    texts = []
    for c in sources:
        got = 0
        for _, t in c.read():
            texts.append(t)
            got += len(t)
            if got >= per:
                break
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=4.0, help="MB of text")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5, help="alternating runs of each; the best is kept")
    ap.add_argument("--workers", type=int, default=None, help="pipeline processes (default: all cores)")
    ap.add_argument("--smoke", action="store_true", help="0.2 MB, vocab 512, one run: that the benchmark runs")
    args = ap.parse_args()
    if args.smoke:
        args.mb, args.vocab, args.repeats = 0.2, 512, 1
    workers = args.workers or len(os.sched_getaffinity(0))
    os.environ["RAYON_NUM_THREADS"] = str(workers)  # the raw side's threads: one per pipeline process

    from tokenizers import Tokenizer

    from pretrain.data.config import TokenizerConfig
    from pretrain.data.tokenizer import train_bpe

    texts = _corpus(args.mb)
    nchars = sum(map(len, texts))
    tmp = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    try:
        cfg = TokenizerConfig(vocab_size=args.vocab)
        tok_dir = tmp / "tokenizer"
        tok_dir.mkdir()
        train_bpe(texts[::4], cfg).save(str(tok_dir / "tokenizer.json"))
        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        eod = tok.token_to_id(cfg.eod_token)
        (tok_dir / "manifest.json").write_text(json.dumps({"vocab_size": tok.get_vocab_size(), "eod_id": eod}))
        part = tmp / "bench.jsonl"
        part.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
        print(f"{len(texts):,} documents, {nchars / 1e6:.1f} MB, vocab {args.vocab}, {workers} processes / threads")

        def pipeline(r: int) -> float:
            """The pipeline's tokenize+write stage (its tasks on the local executor) over the same texts."""
            from rich.console import Console

            from pretrain.data import pipeline as data_pipeline, stages

            data_cfg = {"name": "bench", "cache_dir": str(tmp), "num_workers": workers, "progress": False,
                        "sources": [{"name": "bench", "path": str(part), "curated": True}], "tokenizer": {"vocab_size": args.vocab}}
            typed, eff = data_pipeline.check(data_cfg)
            run = data_pipeline._Run(typed, eff, Console(quiet=True))
            t0 = time.perf_counter()
            out = stages.shards(run, {"shards": f"run{r}", "tokenizer": "bench"}, {"bench": [part]}, tok_dir / "tokenizer.json")
            seconds = time.perf_counter() - t0
            assert json.loads((out / "manifest.json").read_text())["sources"]["bench"]["tokens"] == ntok
            shutil.rmtree(out)
            shutil.rmtree(tmp / "_logs")
            return seconds

        ntok = sum(len(e.ids) + 1 for e in tok.encode_batch(texts, add_special_tokens=False))  # warm-up
        first = pipeline(-1)  # starts the executor's process server
        raw, pipe = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            assert sum(len(e.ids) + 1 for e in tok.encode_batch(texts, add_special_tokens=False)) == ntok
            raw.append(ntok / (time.perf_counter() - t0))
            pipe.append(ntok / pipeline(r))
        runs = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)
        print(f"{ntok:,} tokens per run; best of {args.repeats} alternating runs (all runs in brackets)")
        print(f"raw encode_batch        : {max(raw):10,.0f} tokens/s  [{runs(raw)}]")
        print(f"pipeline tokenize+write : {max(pipe):10,.0f} tokens/s  [{runs(pipe)}]")
        print(f"first pipeline run      : {ntok / first:10,.0f} tokens/s  ({first:.1f} s, with the process server's start)")
        ratio = max(pipe) / max(raw)
        paired = sorted(p / r for p, r in zip(pipe, raw))[len(raw) // 2]
        print(f"ratio pipeline/raw      : {ratio:.3f} best vs best (overhead {1 - ratio:+.1%}), "
              f"{paired:.3f} median of back-to-back pairs")
        print(f"pipeline MB/s per core  : {nchars / 1e6 / (ntok / max(pipe)) / workers:.2f}")
        print("(wall-clock numbers swing with other load on the machine: run it on an idle one)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
