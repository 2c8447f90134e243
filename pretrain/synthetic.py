"""A synthetic token stream for tests and throughput runs (``data=synthetic``): no files, no tokenizer.

Each sample follows a noisy affine recurrence over the vocabulary, so a model can learn it and
the loss falls. Sample i depends only on (seed, i): identical on every rank and layout.
"""

from __future__ import annotations

import torch


class SyntheticDataset:
    def __init__(self, vocab_size: int, seq_length: int, seed: int, num_samples: int):
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        v = self.vocab_size
        steps = torch.randint(1, 8, (1,), generator=gen).item()
        start = torch.randint(0, v, (1,), generator=gen).item()
        seq = (start + steps * torch.arange(self.seq_length + 1)) % v
        noise = torch.rand(self.seq_length + 1, generator=gen) < 0.1
        seq = torch.where(noise, torch.randint(0, v, (self.seq_length + 1,), generator=gen), seq)
        return {"tokens": seq[:-1].clone(), "labels": seq[1:].clone()}
