"""The shipped tasks' datasets, for lm-eval's ``custom_dataset: !function data.<task>`` (it loads this
file by path). The examples come from ``pretrain.evaluate.taskdata``; nothing is downloaded."""


def _dataset(task: str):
    import datasets

    from pretrain.evaluate.taskdata import splits

    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits(task).items()})


def pretrain_lastword(**_metadata):
    return _dataset("pretrain_lastword")


def pretrain_cloze(**_metadata):
    return _dataset("pretrain_cloze")
