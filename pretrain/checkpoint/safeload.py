"""Read checkpoint files without running code from them.

A ``.pt`` file is a pickle, and a pickle can name any callable (``os.system``) to be called on load.
Every read of checkpoint content goes through ``load``: ``torch.load(weights_only=True)``, which
rebuilds only tensors, numbers, strings and containers, plus the few plain data classes DeepSpeed's
own files hold (``engine.records``). A file needing anything else is refused, naming the file and
the global, before that global is touched. DeepSpeed's loader is routed here too
(``engine.TrainEngine`` replaces its checkpoint engine's ``load``).

The manifest's checksums (checkpoint.py) catch damage, not intent: whoever supplies a checkpoint
writes its manifest too. This module is what makes a hostile checkpoint inert.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from pretrain.errors import CheckpointError


def _safe_globals() -> list:
    """The plain data classes DeepSpeed's checkpoint files contain (the engine package names them)."""
    from pretrain.engine.records import checkpoint_record_classes

    return checkpoint_record_classes()


def load(path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """The content of checkpoint file ``path``; CheckpointError if it is hostile, truncated or damaged."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = found.group(1) if found else "an object outside tensors, numbers, strings and containers"
        raise CheckpointError(
            f"{path}: refused to load: the file needs {what}, which a checkpoint never holds (loading it could "
            "run code). Do not use this checkpoint; if you wrote it yourself with another tool, re-save its "
            "tensors with safetensors or torch.save of plain tensors"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: the checkpoint file is missing") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"{path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}); the file is "
            "truncated or damaged. Use an earlier checkpoint"
        ) from None


def load_for_deepspeed(path: str, map_location: Any = None) -> Any:
    """Drop-in for DeepSpeed's ``CheckpointEngine.load(path, map_location)``."""
    return load(path, map_location=map_location)
