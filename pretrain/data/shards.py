"""Stage 6, tokenize + write: megatron-core IndexedDataset shards (.bin/.idx), one prefix per source.

Documents are cut into chunks; worker processes (forked, one tokenizer thread each) encode a
chunk and write it as a partial IndexedDataset, and the parent concatenates the partials of each
source in order with ``IndexedDatasetBuilder.add_index``. The end-of-text id ends every document.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

_TOK = None  # the worker's tokenizer
_EOD = -1


# Workers fork from a fresh server process (see write_shards); it imports what they need once.
_PRELOAD = ["pretrain.data.shards", "megatron.core.datasets.indexed_dataset"]


def _server_context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def start_worker_server() -> None:
    """Start the workers' server now, so that its imports (megatron-core, torch: seconds) overlap the
    stages before tokenize+write instead of delaying it. Returns at once."""
    from multiprocessing import forkserver

    _server_context()
    forkserver.ensure_running()


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _init_worker(tokenizer_file: str, eod: int, single_thread: bool) -> None:
    global _TOK, _EOD
    if single_thread:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _TOK, _EOD = Tokenizer.from_file(tokenizer_file), eod


def _encode_and_write(task: Tuple[str, Sequence[str], str]) -> Tuple[str, int, int, int]:
    """Encode one chunk and write it as the IndexedDataset at ``prefix``; returns counts."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix, texts, dtype_name = task
    dtype = np.dtype(dtype_name).type
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    ntok = 0
    for i in range(0, len(texts), 512):
        for enc in _TOK.encode_batch(list(texts[i : i + 512]), add_special_tokens=False):
            ids = np.array(enc.ids + [_EOD], dtype=dtype)
            builder.add_document(ids, [ids.size])
            ntok += ids.size
    builder.finalize(prefix + ".idx")
    return prefix, len(texts), ntok, sum(len(t.encode("utf-8")) for t in texts)


def _chunks(texts: List[str], max_chars: int) -> List[List[str]]:
    out, cur, size = [], [], 0
    for t in texts:
        cur.append(t)
        size += len(t)
        if size >= max_chars:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


def _merge(final: Path, prefixes: List[str], dtype_name: str, counts: dict) -> dict:
    """Concatenate partial IndexedDatasets (in order) into ``final``.bin/.idx; remove the parts."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{final}.bin", dtype=np.dtype(dtype_name).type)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(f"{final}.idx")
    for p in prefixes:
        os.remove(p + ".bin")
        os.remove(p + ".idx")
    return {
        "prefix": str(final),
        "docs": sum(counts[p][0] for p in prefixes),
        "tokens": sum(counts[p][1] for p in prefixes),
    }


def write_shards(
    texts_by_source: Dict[str, List[str]],
    tokenizer_file: str,
    eod: int,
    vocab_size: int,
    out_dir: Path,
    num_workers: Optional[int] = None,
    chunk_chars: Optional[int] = None,
    on_chunk: Optional[Callable[[int, int, int], None]] = None,
) -> Dict[str, dict]:
    """Write ``out_dir/<source>.bin/.idx``; returns {source: {prefix, docs, tokens}}.

    ``on_chunk(docs, bytes, tokens)`` is called as chunks finish (progress); ``num_workers`` None uses every
    core this process may run on. Workers are forked, so the
    caller's imports (megatron-core, tokenizers) are not paid again.
    """
    import warnings

    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed" on CPU
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype_name = np.dtype(token_dtype(vocab_size)).name
    workers = max(1, num_workers or len(os.sched_getaffinity(0)))
    if chunk_chars is None:  # ~16 chunks per worker keeps them all busy to the end
        total = sum(len(t) for texts in texts_by_source.values() for t in texts)
        chunk_chars = int(min(max(total / (16 * workers), 100_000), 4_000_000))
    parts_dir = out_dir / "_parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    tasks, parts = [], {}
    for name, texts in texts_by_source.items():
        parts[name] = []
        for k, chunk in enumerate(_chunks(texts, chunk_chars)):
            prefix = str(parts_dir / f"{name}-{k:05d}")
            parts[name].append(prefix)
            tasks.append((prefix, chunk, dtype_name))
    # Big chunks first keeps both workers busy until the end.
    tasks.sort(key=lambda t: -sum(len(x) for x in t[1]))

    workers = min(workers, len(tasks))
    counts = {}
    if workers == 1:
        _init_worker(tokenizer_file, eod, single_thread=False)
        results = map(_encode_and_write, tasks)
        for prefix, ndocs, ntok, nbytes in results:
            counts[prefix] = (ndocs, ntok)
            on_chunk and on_chunk(ndocs, nbytes, ntok)
    else:
        # Workers fork from a fresh server process, never from this one: the trainer calls this
        # with gloo, OpenMP and tokenizers threads running, and a fork then can deadlock a child
        # on a lock one of those threads held (seen as a hang of the data prep inside a job).
        pool = _server_context().Pool(workers, initializer=_init_worker, initargs=(tokenizer_file, eod, True))
        with pool:
            for prefix, ndocs, ntok, nbytes in pool.imap_unordered(_encode_and_write, tasks):
                counts[prefix] = (ndocs, ntok)
                on_chunk and on_chunk(ndocs, nbytes, ntok)

    # add_index runs gc.collect() per part, which costs ~0.3 s each with torch and megatron-core
    # loaded; frozen objects are skipped, so only what the merge itself allocates is scanned.
    gc.freeze()
    try:
        out = {name: _merge(out_dir / name, prefixes, dtype_name, counts) for name, prefixes in parts.items()}
    finally:
        gc.unfreeze()
    os.rmdir(parts_dir)
    return out
