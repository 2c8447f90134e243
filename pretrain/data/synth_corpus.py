"""A synthetic JSONL corpus with planted duplicates and contamination, for testing the pipeline at scale.

    python -m pretrain.data.synth_corpus --bytes 200M --out /tmp/synth [--seed 0] [--shard-bytes 64M]
        [--compression none|gzip|zstd] [--eval-files F ...] [--smoke]

Documents (``{"text": ..., "id": ...}`` per line, ``part-00000.jsonl`` ...) are assembled from
sentences sampled from the built-in prose corpora (pretrain/data/corpus.py: austen, kjv,
shakespeare, pydocs, jargon; code is left out), one corpus per document, so base documents are
unique and share almost no word 5-grams (pairwise Jaccard ~0.01). Every document passes the
clean stage unchanged (paragraph lines ending in terminal punctuation, >= 5 sentences, no braces).

Planted, and listed in ``DIR/key.json`` (see ``Key``):
- exact duplicates: a document repeated later (possibly in another shard), verbatim or with the
  whitespace/case changes that dedup.py's exact key normalises away (lower-case, split/join);
- near-duplicates: clusters of a base document and 1-3 variants, each at a target Jaccard
  similarity to the base over dedup.py's shingles (``shingle_words`` of ``\\w+`` words of the
  lower-cased text). Variants replace whole sentences and then single words; the number of word
  substitutions is binary-searched to land on the target, and the exact Jaccard of every pair
  in a cluster is recorded;
- contamination: spans of 13-40 whitespace-separated words copied verbatim from the evaluation
  files, inserted between the sentences of otherwise clean documents. Base documents are checked
  against the evaluation 13-grams, so only planted documents are contaminated.

``--bytes`` counts uncompressed JSONL bytes, and so does ``--shard-bytes``. Output is a function of
the seed, the arguments and the installed corpora only (byte-identical across runs). Memory holds
the sentence pool (~25 MB of text) and the planted documents waiting for their later position.

The pipeline reads a folder recursively, key.json and a generated eval file included: point a
source at the shards with a glob, ``path: DIR/part-*.jsonl``.

The parts live in pretrain/data/synth/: pool.py (sentences, evaluation n-grams), docs.py (base
documents and plants), planter.py (the stream), shards.py (writing, the key, reading back).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from pretrain.data.config import DecontamConfig, DedupConfig
from pretrain.data.decontam import build_eval_ngrams
from pretrain.data.synth.docs import EvalSpans
from pretrain.data.synth.planter import DEFAULT_TARGETS, Planter, PlantConfig
from pretrain.data.synth.pool import PROSE_CORPORA, default_eval_files, load_pools, write_eval_file
from pretrain.data.synth.shards import KEY_FORMAT, Key, ShardWriter, read_shards, verify
from pretrain.errors import UserError

__all__ = [
    "generate", "main", "parse_bytes", "Key", "PlantConfig", "read_shards", "verify", "PROSE_CORPORA", "DEFAULT_TARGETS", "KEY_FORMAT",
]


def generate(
    out_dir,
    total_bytes: int,
    seed: int = 0,
    *,
    shard_bytes: int = 64 << 20,
    compression: str = "none",
    eval_files: Optional[Sequence[str]] = None,
    plants: Optional[PlantConfig] = None,
    dedup: Optional[DedupConfig] = None,
    decontam: Optional[DecontamConfig] = None,
    corpora: Sequence[str] = PROSE_CORPORA,
    log=None,
) -> Key:
    """Write ``total_bytes`` (uncompressed JSONL) of documents into ``out_dir`` (new or empty) and its key.

    ``eval_files`` None: the built-in data config's evaluation files, or, when those are missing,
    a generated ``out_dir/eval/synthetic_eval.jsonl``. ``dedup``/``decontam``: the settings whose
    shingles and n-grams the planted similarities and spans are measured with (default: the schema's).
    """
    t0 = time.time()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; give a new or empty folder")
    plants, dedup, decontam = plants or PlantConfig(), dedup or DedupConfig(), decontam or DecontamConfig()
    if not (min(plants.targets) < dedup.threshold < max(plants.targets)):
        raise UserError(f"near-duplicate targets {plants.targets} should lie on both sides of the dedup threshold {dedup.threshold}")
    writer = ShardWriter(out, shard_bytes, compression)  # checks compression before any work
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n, k = decontam.ngram, dedup.shingle_words

    files = list(eval_files) if eval_files is not None else default_eval_files()
    for f in files:
        if not Path(f).is_file():
            raise UserError(f"--eval-files: {f} does not exist")
    generated = not files
    eval_ngrams = build_eval_ngrams(files, n) if files else np.zeros(0, dtype=np.uint64)
    pools, missing = load_pools(corpora, files, eval_ngrams, n)
    for name, why in missing.items():
        _say(log, f"synth_corpus: corpus {name} left out: {why}")
    names = [str(Path(f).resolve()) for f in files]
    if generated:
        write_eval_file(out / "eval" / "synthetic_eval.jsonl", rng, pools, n)
        files, names = [str(out / "eval" / "synthetic_eval.jsonl")], ["eval/synthetic_eval.jsonl"]
        eval_ngrams = build_eval_ngrams(files, n)
        for p in pools:
            p.index_words()  # the held-out sentences left the pool
    spans = EvalSpans(files, names, n)
    _say(log, f"synth_corpus: {sum(len(p.sentences) for p in pools):,} sentences from {', '.join(p.name for p in pools)} in {time.time() - t0:.1f}s")

    planter = Planter(writer, rng, pools, plants, spans, eval_ngrams, n, k)
    while not planter.done(total_bytes):
        planter.step(total_bytes)
    writer.close()
    exact, near, contam = planter.exact, planter.near, planter.contam
    for c in near:
        ids = [c["base"]] + [v["id"] for v in c["variants"]]
        for p in c["pairs"]:
            p["a"], p["b"] = ids[p["a"]], ids[p["b"]]
    key = Key(
        format=KEY_FORMAT, seed=seed, target_bytes=int(total_bytes), bytes=writer.bytes, documents=writer.docs,
        compression=compression, shards=writer.shards,
        corpora={p.name: dict(sentences=len(p.sentences), documents=planter.counts[p.name]) for p in pools},
        missing_corpora=missing, eval_files=names, eval_files_generated=generated,
        dedup=asdict(dedup), decontam_ngram=n, plants=asdict(plants),
        exact_duplicates=exact, near_duplicates=near, contamination=contam,
        totals=dict(
            documents=writer.docs,
            bytes=writer.bytes,
            shards=len(writer.shards),
            seed=seed,
            base_documents=writer.docs - sum(len(e["copies"]) for e in exact) - sum(len(c["variants"]) for c in near),
            exact_duplicate_groups=len(exact),
            exact_duplicate_copies=sum(len(e["copies"]) for e in exact),
            near_duplicate_clusters=len(near),
            near_duplicate_variants=sum(len(c["variants"]) for c in near),
            near_duplicate_pairs=sum(len(c["pairs"]) for c in near),
            contaminated_documents=len(contam),
            contamination_spans=sum(len(c["spans"]) for c in contam),
            rejected_for_eval_overlap=planter.rejected,
        ),
    )
    key.save(out / "key.json")
    dt = time.time() - t0
    _say(log, f"synth_corpus: {writer.docs:,} documents, {writer.bytes / 1e6:,.1f} MB in {len(writer.shards)} shards, "
              f"{dt:.1f}s ({writer.bytes / 1e6 / max(dt, 1e-9):.1f} MB/s) -> {out}")
    return key


def _say(log, msg: str) -> None:
    (log or (lambda m: print(m, file=sys.stderr)))(msg)


# ---- CLI ------------------------------------------------------------------------------------------


def parse_bytes(s: str) -> int:
    """``200M``, ``2G``, ``512K``, ``2.5GB`` or a plain number of bytes (powers of 10)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)b?\s*", str(s), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"{s!r} is not a size (e.g. 200M, 2G, 1048576)")
    return int(float(m.group(1)) * 1000 ** " kmgt".index(m.group(2).lower() or " "))


def main(argv: Optional[List[str]] = None) -> None:
    from pretrain.errors import user_errors

    ap = argparse.ArgumentParser(prog="synth_corpus", description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=parse_bytes, help="uncompressed JSONL bytes to write (200M, 2G, ...)")
    ap.add_argument("--out", required=True, help="a new or empty folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-bytes", type=parse_bytes, default=64 << 20, help="uncompressed bytes per shard (default 64 MiB)")
    ap.add_argument("--compression", default="none", choices=["none", "gzip", "zstd"])
    ap.add_argument("--eval-files", nargs="+", default=None, help="default: the built-in data config's eval_files")
    ap.add_argument("--smoke", action="store_true", help="2 MB (unless --bytes), then re-read and check it against the key")
    ap.add_argument("--debug", action="store_true", help="tracebacks for bad input")
    args = ap.parse_args(argv)
    with user_errors("synth_corpus", debug=args.debug):
        if args.bytes is None and not args.smoke:
            raise UserError("give --bytes N (e.g. --bytes 200M), or --smoke")
        generate(args.out, args.bytes or 2_000_000, seed=args.seed, shard_bytes=args.shard_bytes,
                 compression=args.compression, eval_files=args.eval_files)
        if args.smoke:
            problems = verify(args.out)
            print("synth_corpus: smoke check " + ("passed" if not problems else "FAILED:\n  " + "\n  ".join(problems)), file=sys.stderr)
            if problems:
                sys.exit(1)


if __name__ == "__main__":
    main()
