"""One source's shard from its tokenize+write tasks' parts, in bounded memory.

megatron-core's ``IndexedDatasetBuilder.add_index`` gathers every sequence's length and document
index as Python ints before it writes the index: about 100 bytes a document, gigabytes for a crawl
of tens of millions of documents. Here the parts' indices are read with megatron-core's reader
(memory-mapped) and written with its writer's header, a block at a time: the same bytes.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import List

import numpy as np

_BLOCK = 1 << 20


def merge_parts(folder: Path, source: str, ranks: List[int], token_size: int) -> None:
    """Concatenate the partial IndexedDatasets of ``ranks`` (in order) into ``folder/<source>``."""
    from megatron.core.datasets.indexed_dataset import DType, _IndexReader, _IndexWriter, get_bin_path, get_idx_path

    dtype = np.uint16 if token_size == 2 else np.int32
    prefixes = [str(folder / "_parts" / f"{r:05d}") for r in ranks]
    with open(folder / f"{source}.bin", "wb") as out:
        for p in prefixes:
            with open(get_bin_path(p), "rb") as f:
                shutil.copyfileobj(f, out, _BLOCK)
    readers = [_IndexReader(get_idx_path(p), multimodal=False) for p in prefixes]
    for p, r in zip(prefixes, readers):
        if r.dtype != dtype:
            raise ValueError(f"{p}: tokens of {r.dtype.__name__}, expected {dtype.__name__}")
    itemsize = np.int64(DType.size(dtype))
    with _IndexWriter(str(folder / f"{source}.idx"), dtype) as w:
        f = w.idx_writer
        f.write(struct.pack("<Q", sum(r.sequence_count for r in readers)))
        f.write(struct.pack("<Q", 1 + sum(len(r.document_indices) - 1 for r in readers)))
        for r in readers:
            _write(f, r.sequence_lengths, np.int32)
        at = np.int64(0)  # byte offset of a part's first sequence: the earlier parts' tokens
        for r in readers:
            _write(f, r.sequence_pointers, np.int64, at)
            at += np.int64(r.sequence_lengths.sum(dtype=np.int64)) * itemsize
        f.write(np.zeros(1, np.int64).tobytes())
        offset = 0
        for r in readers:
            _write(f, r.document_indices[1:], np.int64, offset)
            offset += r.sequence_count


def _write(f, values: np.ndarray, dtype, add=0) -> None:
    for a in range(0, len(values), _BLOCK):
        f.write((np.asarray(values[a : a + _BLOCK], dtype=dtype) + dtype(add)).astype(dtype).tobytes(order="C"))
