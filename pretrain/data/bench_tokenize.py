"""Benchmark: tokenize+write (the pipeline's shard stage) vs raw ``tokenizers`` ``encode_batch``.

Same text, same tokenizer, same cores. Prints tokens/s of both and the ratio; the pipeline's
overhead over raw encoding should stay under 25%.

    python -m pretrain.data.bench_tokenize [--mb 8] [--vocab 8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
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


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (worker processes)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=4.0, help="MB of text")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5, help="alternating runs of each; the best is kept")
    ap.add_argument("--workers", type=int, default=None, help="pipeline processes (default: all cores)")
    args = ap.parse_args()

    from tokenizers import Tokenizer

    from pretrain.data.config import TokenizerConfig
    from pretrain.data.shards import write_shards
    from pretrain.data.tokenizer import train_bpe

    texts = _corpus(args.mb)
    nchars = sum(map(len, texts))
    tmp = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    try:
        cfg = TokenizerConfig(vocab_size=args.vocab)
        train_bpe(texts[::4], cfg).save(str(tmp / "tok.json"))
        tok = Tokenizer.from_file(str(tmp / "tok.json"))
        eod = tok.token_to_id(cfg.eod_token)
        cores = len(os.sched_getaffinity(0))
        print(f"{len(texts):,} documents, {nchars / 1e6:.1f} MB, vocab {args.vocab}, {cores} cores")
        # Imported before timing: the pipeline's workers are forked with it already loaded.
        import megatron.core.datasets.indexed_dataset  # noqa: F401

        raw, pipe, raw_cpu, pipe_cpu = [], [], [], []
        for r in range(args.repeats):
            t0, c0 = time.perf_counter(), _cpu_seconds()
            ntok = sum(len(e.ids) + 1 for e in tok.encode_batch(texts, add_special_tokens=False))
            raw.append(ntok / (time.perf_counter() - t0))
            raw_cpu.append(ntok / (_cpu_seconds() - c0))
            out = tmp / f"run{r}"
            out.mkdir()
            t0, c0 = time.perf_counter(), _cpu_seconds()
            res = write_shards({"bench": texts}, str(tmp / "tok.json"), eod, tok.get_vocab_size(), out, args.workers)
            pipe.append(ntok / (time.perf_counter() - t0))
            pipe_cpu.append(ntok / (_cpu_seconds() - c0))
            assert res["bench"]["tokens"] == ntok
            shutil.rmtree(out)
        runs = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)
        print(f"{ntok:,} tokens per run; best of {args.repeats} alternating runs (all runs in brackets)")
        print(f"raw encode_batch        : {max(raw):10,.0f} tokens/s  {max(raw_cpu):10,.0f} tokens/CPU-s  [{runs(raw)}]")
        print(f"pipeline tokenize+write : {max(pipe):10,.0f} tokens/s  {max(pipe_cpu):10,.0f} tokens/CPU-s  [{runs(pipe)}]")
        ratio, cpu_ratio = max(pipe) / max(raw), max(pipe_cpu) / max(raw_cpu)
        paired = sorted(p / r for p, r in zip(pipe, raw))[len(raw) // 2]
        print(f"ratio pipeline/raw      : {ratio:.3f} best vs best (overhead {1 - ratio:+.1%}), "
              f"{paired:.3f} median of back-to-back pairs, {cpu_ratio:.3f} per CPU-second")
        print("(wall-clock numbers swing with other load on the machine; the CPU-second ratio is steadier)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
