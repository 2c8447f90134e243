"""EpochGPTDataset: megatron-core's GPTDataset, repeated epoch by epoch without early repeats.

megatron-core's GPTDataset shuffles the samples of all full epochs together, so a document can
come back before an epoch is over. Here indices are built for one epoch only, and sample i of
epoch e >= 1 is sample perm_e[i] of that epoch, with perm_e seeded by (seed, dataset, e): within
every epoch each packed sample, hence each document, appears once. (Packing windows are the
same in every epoch; only their order changes.) Importing this module imports megatron-core.
"""

from __future__ import annotations

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
            key = int(self.unique_description_hash[:8], 16)
            rng = np.random.default_rng([self.config.random_seed, key, epoch])
            self._perms[epoch] = rng.permutation(self.samples_per_epoch)
        return int(self._perms[epoch][j])

    def __getitem__(self, idx):
        return super().__getitem__(None if idx is None else self.epoch_sample(idx))
