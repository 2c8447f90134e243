"""The bodies of the stages' tasks (see tasks.py): what one task does with its unit.

Each runs in a worker process (or a Slurm task, or a Ray actor) from a plain-data context: the data
config as a dict, the cache root, and the upstream part files. Each streams: it holds one chunk's
documents at most, except the steps that need a whole view (the quality classifier and the tokenizer:
their bounded training samples; dedup: the signatures of the documents kept so far).
"""

from __future__ import annotations

import functools
import json
import os
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List

from datatrove.pipeline.base import PipelineStep

from pretrain.data.clean_tasks import clean_files_task, clean_task
from pretrain.data.stats import stage_counts
from pretrain.data.tasks import PART, RESULTS, Chunk, Counted, config, read_chunk, read_parts, save_array, write_part
from pretrain.errors import UserError


# ---- the datatrove step every task runs -------------------------------------------------------------


TaskFn = Callable[[dict, object, Path, int], dict]
_TASKS: Dict[str, TaskFn] = {}


def task(name: str):
    """Register ``fn(context, unit, folder, rank) -> result`` as the body of stage ``name``'s tasks."""

    def register(fn: TaskFn) -> TaskFn:
        _TASKS[name] = fn
        return fn

    return register


class StageTasks(PipelineStep):
    """Runs task ``rank`` of a stage: the registered body on ``units[rank]``; writes its result to
    ``folder/_results/<rank>.json``. A bad-input error (UserError) is recorded as the result, so the
    driver raises it with its own message instead of a worker's traceback."""

    name = "pretrain stage"
    type = "pretrain"

    def __init__(self, stage: str, units: list, context: dict, folder: str):
        super().__init__()
        self.stage, self.units, self.context, self.folder = stage, units, context, folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        folder, t0 = Path(self.folder), time.time()
        try:
            result = _TASKS[self.stage](self.context, self.units[rank], folder, rank)
        except UserError as e:
            result = {"error": {"type": type(e).__name__, "message": str(e)}}
        result["seconds"] = round(time.time() - t0, 3)
        out = folder / RESULTS / f"{rank:05d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, out)
        return None


def _parts(ctx: dict, name: str) -> List[Path]:
    root = Path(ctx["root"])
    return [root / p for p in ctx["parts"][name]]


# ---- read + clean (clean_tasks.py) ------------------------------------------------------------------


task("clean-files")(clean_files_task)
task("clean")(clean_task)


# ---- the quality classifier, dedup and the tokenizer: one task that sees every source ---------------


@task("quality-fit")
def quality_fit_task(ctx: dict, unit, folder: Path, rank: int) -> dict:
    """The classifier, from bounded samples of the curated and the filtered sources' documents."""
    from pretrain.data.config import QualityConfig
    from pretrain.data.quality import fit_model, save_model

    texts = lambda names: (t for n in names for _, t in read_parts(_parts(ctx, n)))
    model, sample = fit_model(texts(ctx["curated"]), texts(ctx["targets"]), QualityConfig(**ctx["quality"]))
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / "model.npz", model)
    return {"sample": sample}


@functools.lru_cache(maxsize=2)
def _quality_model(path: str):
    from pretrain.data.quality import load_model

    return load_model(Path(path))


def _chunk_docs(ctx: dict, unit: Chunk) -> "Counted":
    return Counted(read_chunk(Path(ctx["root"]), unit))


@task("dedup-sig")
def dedup_sig_task(ctx: dict, unit: Chunk, folder: Path, rank: int) -> dict:
    """One chunk's exact keys and MinHash signatures, as .npy files."""
    from pretrain.data.dedup import signatures

    keys, sigs = signatures((t for _, t in _chunk_docs(ctx, unit)), config(ctx).stages.dedup)
    save_array(folder / f"keys-{rank:05d}.npy", keys)
    save_array(folder / f"sig-{rank:05d}.npy", sigs)
    return {"docs": len(keys)}


@task("dedup-pairs")
def dedup_pairs_task(ctx: dict, unit: int, folder: Path, rank: int) -> dict:
    """LSH band ``unit``: verified candidate pairs of documents with equal band columns."""
    import numpy as np

    from pretrain.data.dedup import ChunkArrays, bands, by_later, verified_pairs_in_passes

    cfg, sig_dir = config(ctx).stages.dedup, Path(ctx["root"]) / ctx["sig_dir"]
    arrays = ChunkArrays(sig_dir, ctx["counts"], ctx["chunk_sources"])
    exact = np.load(sig_dir / "exact.npy", mmap_mode="r")  # the driver's exact mask: skipped
    _, r = bands(cfg)
    pairs = verified_pairs_in_passes(arrays.band_block(unit, r), arrays.n, exact, cfg.docs_per_pass, arrays.rows_of,
                                     cfg.threshold)
    save_array(folder / f"pairs-{unit:05d}.npy", by_later(pairs))
    return {"pairs": len(pairs)}


@task("dedup")
def dedup_filter_task(ctx: dict, unit: Chunk, folder: Path, rank: int) -> dict:
    """One chunk's documents minus those the greedy pass removed (``fate.npy``)."""
    import numpy as np

    from pretrain.data.dedup import KEEP, REASONS

    fate = np.load(Path(ctx["root"]) / ctx["fate"], mmap_mode="r")
    start, docs, why = ctx["offsets"][rank], _chunk_docs(ctx, unit), Counter()

    def kept():
        for i, doc in enumerate(docs):
            f = int(fate[start + i])
            if f == KEEP:
                yield doc
            else:
                why[REASONS[f]] += 1

    n, nbytes = write_part(folder / unit.source / PART.format(rank), kept())
    if docs.n != ctx["counts"][rank]:
        raise RuntimeError(f"dedup: chunk {rank} has {docs.n} documents, its signatures {ctx['counts'][rank]}")
    return {"source": unit.source, "stats": stage_counts(docs.n, docs.nbytes, n, nbytes, why), "progress": {"docs": docs.n}}


@task("tokenizer")
def tokenizer_task(ctx: dict, unit, folder: Path, rank: int) -> dict:
    from pretrain.data.tokenizer import eod_id, load_fixed, train_bpe

    cfg = config(ctx)
    tc = cfg.tokenizer
    if tc.kind == "bpe":
        tok = train_bpe(_sample(ctx, tc.train_bytes, tc.seed), tc)
        what = f"trained a byte-level BPE, vocab {tok.get_vocab_size():,}"
    else:
        tok = load_fixed(tc)
        what = f"loaded the {tc.kind} tokenizer, vocab {tok.get_vocab_size():,}"
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return {"vocab_size": tok.get_vocab_size(), "eod_id": eod_id(tok, tc.eod_token), "what": what}


def _sample(ctx: dict, budget: int, seed: int) -> List[str]:
    """A seeded sample of about ``budget`` bytes of text, each source contributing in proportion to
    its size: every document is drawn with probability budget / total (all of them when the corpus
    is smaller), streaming, so memory is bounded by the budget."""
    import numpy as np

    total = sum(ctx["bytes"].values()) or 1
    p = min(1.0, budget / total)
    out: List[str] = []
    for n in ctx["parts"]:
        rng = np.random.default_rng([seed, zlib.crc32(n.encode())])
        left = p * ctx["bytes"][n]
        for _, text in read_parts(_parts(ctx, n)):
            if left <= 0:
                break
            if p >= 1.0 or rng.random() < p:
                out.append(text)
                left -= len(text.encode("utf-8"))
    return out


# ---- quality, decontam and tokenize+write: one task per chunk of the upstream parts ----------------


@functools.lru_cache(maxsize=2)
def _eval_ngrams(files: tuple, n: int):
    from pretrain.data.decontam import build_eval_ngrams

    return build_eval_ngrams(list(files), n)


@task("decontam")
def decontam_task(ctx: dict, unit: Chunk, folder: Path, rank: int) -> dict:
    from pretrain.data.decontam import decontaminate
    from pretrain.data.validation import effective_stages

    cfg = config(ctx)
    src = next(s for s in cfg.sources if s.name == unit.source)
    c = effective_stages(cfg, src).decontam
    docs = Counted(read_chunk(Path(ctx["root"]), unit))
    kept, why = decontaminate(docs, _eval_ngrams(tuple(cfg.eval_files), c.ngram), c)
    n, nbytes = write_part(folder / unit.source / PART.format(rank), kept)
    return {"source": unit.source, "stats": stage_counts(docs.n, docs.nbytes, n, nbytes, why), "progress": {"docs": docs.n}}


@task("quality")
def quality_task(ctx: dict, unit: Chunk, folder: Path, rank: int) -> dict:
    from pretrain.data.config import QualityConfig
    from pretrain.data.quality import filter_docs

    cfg, why = QualityConfig(**ctx["quality"]), Counter()
    docs = Counted(read_chunk(Path(ctx["root"]), unit))
    model = _quality_model(str(Path(ctx["root"]) / ctx["model"]))
    n, nbytes = write_part(folder / unit.source / PART.format(rank), filter_docs(unit.source, docs, model, cfg, why))
    return {"source": unit.source, "stats": stage_counts(docs.n, docs.nbytes, n, nbytes, why), "progress": {"docs": docs.n}}


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


@task("shards")
def shards_task(ctx: dict, unit: Chunk, folder: Path, rank: int) -> dict:
    """Encode one chunk into a partial megatron IndexedDataset, ``_parts/<rank>.bin/.idx`` (each
    document's ids, then the end-of-text id); the driver concatenates a source's partials in order."""
    import numpy as np
    from datatrove.pipeline.tokens.megatron_tokenizer import MegatronTokenizedFile

    if ctx["single_thread"]:  # one tokenizer thread per worker process: the workers use the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok, eod = _tokenizer(ctx["tokenizer_file"]), ctx["eod_id"]
    token_size = 2 if ctx["vocab_size"] <= np.iinfo(np.uint16).max + 1 else 4
    (folder / "_parts").mkdir(parents=True, exist_ok=True)
    out = MegatronTokenizedFile(str(folder / "_parts"), f"{rank:05d}", token_size=token_size)
    docs, ntok, batch = Counted(read_chunk(Path(ctx["root"]), unit)), 0, []

    def flush():
        nonlocal ntok
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            out.write(enc.ids + [eod])
            ntok += len(enc.ids) + 1
        batch.clear()

    for _, text in docs:
        batch.append(text)
        if len(batch) == 512:
            flush()
    flush()
    out.close()
    return {"source": unit.source, "docs": docs.n, "bytes": docs.nbytes, "tokens": ntok,
            "progress": {"docs": docs.n, "tokens": ntok}}
