"""Peak memory of one training step with the fused chunked loss against logits + cross-entropy.

    python -m pretrain.bench.loss_memory                 # gpt2-124m, vocab 50,304, seq 512, micro-batch 4
    python -m pretrain.bench.loss_memory --smoke         # a tiny model, seconds
    python -m pretrain.bench.loss_memory parallel.activation_checkpointing=selective model.fused_loss_chunk=512

One process, the configured model built as the trainer builds it at pp == 1 (seeded init,
activation checkpointing), then one forward, backward and AdamW step on the same random batch for
``model.fused_loss=false`` and ``true``. Memory is the peak of live tensor bytes on this device:
the parameters plus every tensor the step allocates, counted by storage as operators return them
and released when the storage is freed (on CUDA, the allocator's own peak). Prints both peaks,
split into forward + backward and the optimizer step, and how far the fused one is below.

Measured on CPU, fp32, gpt2-124m (dropout 0.1), vocab 50,304, seq 512, micro-batch 4, in MiB
(forward + backward / with the AdamW step): no recomputation 4566 -> 4370 (-4.3%) / the same;
selective recomputation 2694 -> 2498 (-7.3%), chunk 128: 2463 (-8.6%) / 2695 -> 2666 (-1.1%, the
optimizer's 2666 MiB of fp32 states then dominates). The loss alone (head + cross-entropy forward
and backward over the final hidden states, above the 307 MiB of gradients it leaves): 393 -> 197 MiB.
--smoke: 32.0 -> 20.0 MiB forward + backward (-37%).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pretrain.config import ParallelConfig, compose_training, typed
from pretrain.engine import compat, groups
from pretrain.errors import user_errors
from pretrain.validate import validate

# A tiny model whose logits (512 tokens x 8192 x 4 bytes) dominate the step, as a large vocabulary's do.
SMOKE = ["model=tiny-gpt", "model.hidden_size=64", "model.vocab_size=8192", "trainer.seq_length=128",
         "trainer.micro_batch_size=4", "trainer.global_batch_size=4", "model.fused_loss_chunk=64"]
FULL = ["model=gpt2-124m", "model.vocab_size=50304", "trainer.seq_length=512", "trainer.micro_batch_size=4",
        "trainer.global_batch_size=4"]


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storages alive that operators created while the mode is on, and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and storage.nbytes():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out

    def reset_peak(self) -> None:
        self.peak = self.now


def _step_peaks(model, tokens, labels) -> tuple[int, int]:
    """(forward + backward peak, optimizer step peak) in bytes, parameters included."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if compat.cuda_available():
        torch.cuda.reset_peak_memory_stats()
        model(tokens, labels).backward()
        backward = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        return backward, torch.cuda.max_memory_allocated()
    with LiveTensorBytes() as counter:
        model(tokens, labels).backward()
        backward = params + counter.peak
        counter.reset_peak()
        opt.step()
        return backward, params + counter.peak


def measure(overrides: list[str]) -> dict[str, tuple[int, int]]:
    """{'unfused' | 'fused': (forward + backward peak, optimizer step peak)} in bytes."""
    from pretrain.model.gpt import apply_activation_checkpointing, build_model, padded_vocab_size
    from pretrain.model.init import apply_init

    composed = compose_training(["data=synthetic", *overrides], "the benchmark's overrides")
    validate(composed, world_size=1)
    cfg = typed(composed)
    groups.init_distributed(ParallelConfig())
    compat.seed_model_parallel_rng(cfg.trainer.seed)
    tr = cfg.trainer
    gen = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, cfg.model.vocab_size, (2, tr.micro_batch_size, tr.seq_length), generator=gen)
    peaks = {}
    try:
        for name, fused in (("unfused", False), ("fused", True)):
            model_cfg = replace(cfg.model, fused_loss=fused)
            model = build_model(model_cfg, cfg.parallel).to(compat.device()).train()
            apply_init(model, model_cfg, tr.seed)
            apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing, cfg.parallel.checkpoint_every)
            peaks[name] = _step_peaks(model, tokens.to(compat.device()), labels.to(compat.device()))
            del model
    finally:
        groups.shutdown()
    peaks["vocab"] = padded_vocab_size(cfg.model)
    return peaks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny model instead of gpt2-124m")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied after the preset")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    with user_errors("bench.loss_memory", debug=args.debug):
        overrides = (SMOKE if args.smoke else FULL) + args.overrides
        peaks = measure(overrides)
    print(f"one training step, {' '.join(overrides)} (vocab {peaks['vocab']}), peak tensor memory in MiB:")
    print(f"{'':10}{'fwd+bwd':>10}{'optimizer':>11}{'step':>10}")
    for name in ("unfused", "fused"):
        backward, optimizer = peaks[name]
        print(f"{name:10}{backward / 2**20:10.1f}{optimizer / 2**20:11.1f}{max(backward, optimizer) / 2**20:10.1f}")
    unfused, fused = (max(peaks[n]) for n in ("unfused", "fused"))
    print(f"fused step peak is {1 - fused / unfused:.1%} below unfused")


if __name__ == "__main__":
    main()
