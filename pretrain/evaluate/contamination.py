"""How much of each evaluation task the training data holds: 13-gram overlap, as the data pipeline's
decontamination stage counts it (``pretrain.data.decontam``: words lower-cased, punctuation removed).

The training text is what the trainer samples: each source's training documents (``data.split``'s
first part, the document range megatron-core's dataset builder takes) decoded from the shards of
the run's data config. A task example is contaminated when any of its 13-grams occurs there.
Word hashes are Python's string hashes, so training and task n-grams are computed in one process.
"""

from __future__ import annotations

import numpy as np

from pretrain.data.decontam import ngrams_of

NGRAM = 13


def training_ngrams(data_cfg, n: int = NGRAM) -> tuple[np.ndarray, dict]:
    """(sorted unique n-gram hashes of the training documents, {source: training documents}).

    ``data_cfg``: the run's ``data`` section; its shards are a cache hit of the data pipeline."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from rich.console import Console
    from tokenizers import Tokenizer

    from pretrain.data import prepare_data

    prepared = prepare_data(data_cfg, console=Console(stderr=True, quiet=True))
    tokenizer = Tokenizer.from_file(prepared.tokenizer_file)
    _, train_end = convert_split_vector_to_split_matrix(parse_and_normalize_split(str(data_cfg.split)))[0]
    parts, documents = [], {}
    for source, prefix, _weight in prepared.sources:  # weight-0 sources are never sampled: left out
        shard = IndexedDataset(prefix)
        count = int(round(train_end * len(shard.sequence_lengths)))
        documents[source] = count
        for i in range(count):
            ids = [t for t in shard[i].tolist() if t != prepared.eod_id]
            parts.append(ngrams_of(tokenizer.decode(ids), n))
    grams = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)
    return grams, documents


def overlap(texts: list[str], train: np.ndarray, n: int = NGRAM) -> dict:
    """The share of examples with at least one n-gram in ``train``, and the share of their n-grams there."""
    contaminated = hits = total = 0
    for text in texts:
        grams = ngrams_of(text, n)
        found = int(np.isin(grams, train, assume_unique=True).sum()) if len(train) else 0
        contaminated += found > 0
        hits, total = hits + found, total + len(grams)
    return {"examples": len(texts), "contaminated_examples": contaminated,
            "example_fraction": contaminated / len(texts) if texts else 0.0,
            "ngrams": total, "ngram_fraction": hits / total if total else 0.0}


def task_texts(task: str, include_paths: tuple = ()) -> list[str]:
    """Each test example of a task as one text: the shipped tasks from their examples, any other task
    from lm-eval's documents (its prompt and target, or its choices)."""
    from pretrain.evaluate import taskdata

    if task in taskdata.TASKS:
        return taskdata.texts(task)
    from lm_eval.tasks import TaskManager

    from pretrain.evaluate.lmeval import TASK_DIR, go_offline

    go_offline()
    manager = TaskManager(include_path=[str(TASK_DIR), *map(str, include_paths)], include_defaults=False)
    (loaded,) = manager.load_task_or_group([task]).values()
    docs = loaded.test_docs() if loaded.has_test_docs() else loaded.validation_docs()
    texts = []
    for doc in docs:
        target = loaded.doc_to_target(doc)
        choices = loaded.doc_to_choice(doc) if loaded.config.doc_to_choice else []
        texts.append(" ".join(str(x) for x in [loaded.doc_to_text(doc), *choices, "" if choices else target]))
    return texts


def report(data_cfg, tasks: list[str], include_paths: tuple = ()) -> dict:
    """{"ngram": 13, "training_documents": {source: count}, "tasks": {task: overlap(...)}}."""
    train, documents = training_ngrams(data_cfg)
    return {"ngram": NGRAM, "training_documents": documents, "training_ngrams": int(len(train)),
            "tasks": {task: overlap(task_texts(task, include_paths), train) for task in tasks}}
