"""A source's shard merged from its parts (shard_merge.py) is byte for byte what megatron-core's
IndexedDatasetBuilder.add_index writes, and reads back with megatron-core's IndexedDataset."""

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from pretrain.data.shard_merge import merge_parts


def _part(prefix, dtype, docs):
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        for seq in doc:
            b.add_item(torch.tensor(seq, dtype=torch.int64))
        b.end_document()
    b.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("token_size", [2, 4])
def test_merged_parts_equal_megatron_core_add_index(tmp_path, token_size, monkeypatch):
    import pretrain.data.shard_merge as shard_merge

    monkeypatch.setattr(shard_merge, "_BLOCK", 3)  # blocks smaller than a part
    dtype = np.uint16 if token_size == 2 else np.int32
    rng = np.random.default_rng(token_size)
    (tmp_path / "_parts").mkdir()
    parts = []
    for r in range(5):
        n = 0 if r == 2 else int(rng.integers(1, 9))  # part 2 holds no document
        docs = [[rng.integers(0, 60000, int(rng.integers(1, 20))).tolist() for _ in range(int(rng.integers(1, 3)))]
                for _ in range(n)]
        _part(tmp_path / "_parts" / f"{r:05d}", dtype, docs)
        parts.append(docs)
    ranks = [0, 1, 2, 3, 4]
    merge_parts(tmp_path, "ours", ranks, token_size)
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for r in ranks:
        ref.add_index(str(tmp_path / "_parts" / f"{r:05d}"))
    ref.finalize(str(tmp_path / "ref.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes(), ext
    ds = IndexedDataset(str(tmp_path / "ours"))
    seqs = [seq for docs in parts for doc in docs for seq in doc]
    assert len(ds) == len(seqs) and [ds[i].tolist() for i in range(len(ds))] == seqs
    assert len(ds.document_indices) == 1 + sum(len(docs) for docs in parts)
