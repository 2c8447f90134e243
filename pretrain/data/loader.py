"""Training/validation/test datasets over the prepared shards, with megatron-core's GPT machinery.

``build_datasets`` gives the weighted mixture (BlendedDataset over one GPTDataset per source):
documents packed into ``seq_length + 1`` token windows separated by the end-of-text token, no
padding, shuffled within each epoch of each source (sampling without replacement within an
epoch: see EpochGPTDataset), deterministic from ``seed``. Sample ``i`` of the global stream is ``ds[i]``: resuming from
a consumed-sample count is continuing the index, and data-parallel rank ``r`` of ``dp`` takes its
share of each global batch (e.g. samples ``step * global_batch + r * per_rank + j``).

``build_eval_datasets`` gives one dataset per source over that source's valid (or test)
documents, for per-source validation losses.

Called on every rank; with torch.distributed initialised, megatron-core builds the sample
indices on rank 0 and the others load them from ``<shard_dir>/indices`` after a barrier.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from pretrain.data.mixture import split_fractions


def _epoch_dataset_class():
    from pretrain.data.epoch_dataset import EpochGPTDataset  # imports megatron-core (slow)

    return EpochGPTDataset


class _TokenizerInfo:
    """The few tokenizer facts megatron-core's GPTDataset reads (no tokenization happens there)."""

    def __init__(self, tokenizer_file: str, vocab_size: int, eod: int):
        self.vocab_size, self.eod = vocab_size, eod
        self.pad = -1  # never a real id: samples are packed, never padded
        self.unique_identifiers = {"tokenizer_file": tokenizer_file, "vocab_size": vocab_size, "eod": eod}


def _gpt_config(prepared, split: str, seq_length: int, seed: int, **kw):
    import torch.distributed as dist
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        split=split,
        # megatron-core 0.16 asks for the rank whenever a cache path is set: without a process
        # group the indices are built in memory (cheap at this scale).
        path_to_cache=f"{prepared.shard_dir}/indices" if dist.is_initialized() else None,
        tokenizer=_TokenizerInfo(prepared.tokenizer_file, prepared.vocab_size, prepared.eod_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        **kw,
    )


def _quiet_megatron():
    import logging
    import warnings

    logging.getLogger("megatron.core.datasets").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed" on CPU
        warnings.simplefilter("ignore")
        import megatron.core  # noqa: F401


def build_datasets(
    prepared, data_cfg, seq_length: int, num_samples: Sequence[int], seed: int
) -> Tuple[object, Optional[object], Optional[object]]:
    """(train, valid, test) mixtures; ``num_samples`` = (n_train, n_valid, n_test) sequences.

    Each dataset maps ``i`` to {"tokens": LongTensor[S], "labels": LongTensor[S], ...}
    (megatron-core also returns loss_mask, position_ids and, for a mixture, dataset_id).
    valid/test are None when their split of data_cfg.split or their sample count is 0.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    _quiet_megatron()
    fractions = split_fractions(data_cfg.split)
    if num_samples[0] <= 0 or fractions[0] <= 0:
        raise ValueError("build_datasets: the train split and n_train must be positive")
    sizes = [int(n) if f > 0 and n > 0 else None for n, f in zip(num_samples, fractions)]
    names, prefixes, weights = zip(*prepared.sources)
    # The document split is always data_cfg.split's (the one build_eval_datasets uses), whatever
    # samples are asked for: a split with no samples asked is left out of the split matrix, so
    # megatron-core builds nothing for it, and its documents stay out of the others. (Dropping it
    # from the split string instead would renormalise the split and train on the valid/test
    # documents whenever n_valid = n_test = 0, as the trainer asks.)
    config = _gpt_config(prepared, data_cfg.split, seq_length, seed, blend=(list(prefixes), list(weights)))
    config.split_matrix = [b if s is not None else None for b, s in zip(config.split_matrix, sizes)]
    built = BlendedMegatronDatasetBuilder(_epoch_dataset_class(), [s or 0 for s in sizes], lambda: True, config).build()
    return tuple(ds if s is not None else None for ds, s in zip(built, sizes))


def build_eval_datasets(
    prepared, data_cfg, seq_length: int, seed: int, split: str = "valid", num_samples: Optional[int] = None
) -> Dict[str, object]:
    """{source name: GPTDataset} over each source's ``split`` documents ("valid" or "test").

    ``num_samples`` None gives one pass over those documents. Sources whose split is empty (too
    few documents) are left out.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    _quiet_megatron()
    which = {"valid": 1, "test": 2}[split]
    fractions = split_fractions(data_cfg.split)
    if fractions[which] <= 0:
        return {}
    out = {}
    for name, prefix, _ in prepared.sources:
        config = _gpt_config(prepared, data_cfg.split, seq_length, seed, blend=([prefix], None))
        sizes = [1, None, None]
        sizes[which] = num_samples
        ds = BlendedMegatronDatasetBuilder(_epoch_dataset_class(), sizes, lambda: True, config).build()[which]
        if ds is not None and len(ds) > 0:
            out[name] = ds
    return out
