"""Sources saved with Hugging Face datasets' ``save_to_disk``: a Dataset folder (``state.json`` beside
its Arrow files) or a DatasetDict folder (``dataset_dict.json``, one Dataset folder per split).

``source.hf_split`` picks a DatasetDict's split (default ``train``). Rows are read in batches from the
memory-mapped Arrow files, so a large dataset is never loaded at once; a row is named by its index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, List, Optional

from pretrain.data.records import BadRecords, DataConfigError, checked_text

BATCH_ROWS = 1024


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def dataset_dir(path: Path, split: Optional[str], key: str) -> Path:
    """The Dataset folder of ``path``: itself, or the split of a DatasetDict."""
    if (path / "state.json").is_file():
        if split is not None:
            raise DataConfigError(f"{key}.hf_split={split!r}: {path} is one Dataset, not a DatasetDict of splits; "
                                  "remove hf_split")
        return path
    splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    split = "train" if split is None else split
    if split not in splits:
        raise DataConfigError(f"{key}.hf_split={split!r}: {path} holds the splits {splits}; set {key}.hf_split to one")
    return path / split


def files(directory: Path) -> List[Path]:
    """What identifies the dataset's content: its state (which lists the Arrow files) and the files."""
    state = json.loads((directory / "state.json").read_text())
    return [directory / "state.json"] + [directory / f["filename"] for f in state.get("_data_files", [])]


def _load(directory: Path, key: str):
    from datasets import load_from_disk

    try:
        return load_from_disk(str(directory))
    except Exception as e:  # datasets raises FileNotFoundError, ArrowInvalid, ... for a damaged folder
        raise DataConfigError(f"{key}.path: {directory} cannot be read as a saved dataset "
                              f"({str(e).splitlines()[0]}); re-save it or remove the source") from None


def check_text_field(directory: Path, field: str, key: str) -> None:
    columns = _load(directory, key).column_names
    if field not in columns:
        raise DataConfigError(f"{key}.text_field={field!r} is not a column of {directory} (columns: {columns}); "
                              "set text_field to the one holding the text")


def read(directory: Path, field: str, bad: BadRecords) -> Iterator[str]:
    ds = _load(directory, bad.key).select_columns([field])
    if len(ds) == 0:
        bad.add(directory, 0, "empty_file", "the dataset has no rows")
        return
    row = 0
    for batch in ds.iter(batch_size=BATCH_ROWS):
        for value in batch[field]:
            text, why = checked_text(value, field)
            if why:
                bad.add(directory, row, *why, unit="row")
            else:
                yield text
            row += 1
