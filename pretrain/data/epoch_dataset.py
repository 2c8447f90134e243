"""EpochGPTDataset: megatron-core's GPTDataset, repeated epoch by epoch without early repeats.

megatron-core's GPTDataset shuffles the samples of all full epochs together, so a document can
come back before an epoch is over. Here indices are built for one epoch only, and sample i of
epoch e >= 1 is sample perm_e[i] of that epoch, with perm_e seeded by (seed, source, split, its
documents, sequence length, e): within every epoch each packed sample, hence each document,
appears once. (Packing windows are the
same in every epoch; only their order changes.) Importing this module imports megatron-core.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Dict

import numpy as np

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed" on CPU
    warnings.simplefilter("ignore")
    from megatron.core.datasets.gpt_dataset import GPTDataset


class EpochGPTDataset(GPTDataset):
    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        super().__init__(indexed_dataset, dataset_path, indexed_indices, None, index_split, config)
        self.samples_per_epoch = super().__len__()
        if self.samples_per_epoch == 0:  # fewer tokens than one sequence (e.g. a tiny validation split)
            self.num_samples = 0
        else:
            self.num_samples = self.samples_per_epoch if num_samples is None else max(int(num_samples), 1)
        self._perms: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def epoch_sample(self, idx: int) -> int:
        """The index of global sample ``idx`` within the one-epoch GPTDataset."""
        epoch, j = divmod(int(idx), self.samples_per_epoch)
        if epoch == 0:
            return j
        if epoch not in self._perms:
            rng = np.random.default_rng([self.config.random_seed, self._order_key(), epoch])
            self._perms[epoch] = rng.permutation(self.samples_per_epoch)
        return int(self._perms[epoch][j])

    def _order_key(self) -> int:
        """What the epoch order depends on besides the seed: the source (its shard name), the
        split, its documents and the sequence length. Not megatron-core's unique description,
        which also holds the cache folder, the tokenizer path and the other splits' bookends (so
        a build asking for no validation samples, as the trainer's does, would get another order)."""
        h = hashlib.sha256()
        h.update(json.dumps([os.path.basename(str(self.dataset_path)), self.index_split.name, self.config.sequence_length]).encode())
        h.update(np.ascontiguousarray(self.indices, dtype=np.int64).tobytes())
        return int(h.hexdigest()[:8], 16)

    def __getitem__(self, idx):
        return super().__getitem__(None if idx is None else self.epoch_sample(idx))
