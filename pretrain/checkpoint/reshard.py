"""Resume a checkpoint at another parallel layout, optimizer state included.

    python -m pretrain.checkpoint.reshard CKPT_DIR [--tag stepXXXXXXXX]

``convert`` reads a checkpoint of any layout (``saved.SavedCheckpoint``) and writes its full fp32
master weights and Adam moments, under canonical names, once into ``<tag>/universal/``
(safetensors, one file per state, plus ``meta.json`` with the Adam step and trainer state);
``load_universal`` then fills an engine of the new layout (``TrainEngine.load_full_state``), each
rank reading only the slices it holds. ``checkpoint.resume`` does both when the saved layout
differs from the configured one.

The conversion holds one full fp32 copy of the model (4 bytes per parameter) at a time in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pretrain.checkpoint import manifest
from pretrain.checkpoint.saved import STATES, ReshardError, SavedCheckpoint
from pretrain.errors import CheckpointError
from pretrain.model import weights

UNIVERSAL = "universal"
META = "meta.json"
FORMAT = 1
# How the error for a checkpoint whose parameters do not fit the configured model ends.
FIT_ADVICE = "Resume with the model config the checkpoint was trained with"


def universal_dir(tag_dir: Path) -> Path:
    return Path(tag_dir) / UNIVERSAL


def convert(tag_dir: Path) -> Path:
    """Write ``<tag>/universal/`` from a checkpoint of any layout (once; later calls reuse it if intact)."""
    out = universal_dir(tag_dir)
    if out.is_dir():
        why = _universal_problem(out)
        if why is None:
            return out
        print(f"warning: {out} is damaged ({why}); converting the checkpoint again", file=sys.stderr, flush=True)
        shutil.rmtree(out)
    with malformed(tag_dir):
        return _convert(tag_dir, out)


def _universal_problem(out: Path) -> Optional[str]:
    """Why a universal folder cannot be reused, or None (its files match the checksums in meta.json)."""
    try:
        files = json.loads((out / META).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {META} ({type(err).__name__}: {err})"
    found, expected = manifest.read_expected_files(out, files)
    return found or manifest.compare(expected, manifest.hashes(out, sorted(expected)))


@contextlib.contextmanager
def malformed(tag_dir: Path):
    """A checkpoint file that loads but is not laid out as pretrain writes it: a named error, not a traceback."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise ReshardError(
            f"{tag_dir}: its files are not laid out as a pretrain checkpoint ({type(err).__name__}: {err}); "
            "was it written by another tool or damaged before its manifest was written?"
        ) from None


def _convert(tag_dir: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    saved = SavedCheckpoint(tag_dir)
    staging = Path(tag_dir) / f".{UNIVERSAL}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    step = None
    for k in STATES:  # one state at a time: the model's size in memory, not three times it
        full, found = saved.full_states((k,))
        step = found if found is not None else step
        save_file({name: states[k] for name, states in full.items()}, str(staging / f"{k}.safetensors"))
        del full
    files = manifest.hashes(staging, sorted(p.name for p in staging.iterdir()))
    meta = {"format": FORMAT, "step": step, "layout": saved.layout, "train_state": saved.train_state, "files": files}
    (staging / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(staging, out)  # atomic: a universal folder is complete or absent
    return out


def ensure_universal(tag_dir: Path) -> Path:
    """``convert`` on rank 0 while the others wait; every rank raises if it failed. Collective."""
    problem = None
    if dist.get_rank() == 0:
        try:
            convert(tag_dir)
        except CheckpointError as err:  # a damaged or hostile file: its message names it
            problem = str(err)
        except (OSError, RuntimeError) as err:
            problem = f"{type(err).__name__}: {err}"
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise ReshardError(f"cannot reshard {tag_dir}: {box[0]}")
    return universal_dir(tag_dir)


def load_universal(engine, source: Path) -> dict:
    """Fill the engine's weights, fp32 masters and Adam state from a universal folder; returns its meta.

    Every rank calls it after ``deepspeed.initialize``, and reads only this TP rank's slices.
    """
    from safetensors import safe_open

    source = Path(source)
    meta = json.loads((source / META).read_text())
    if meta.get("format") != FORMAT:
        raise ReshardError(f"{source}: universal format {meta.get('format')}, this version reads {FORMAT}")
    handles = {k: safe_open(str(source / f"{k}.safetensors"), framework="pt") for k in STATES}
    stored = {name: handles["fp32"].get_slice(name).get_shape() for name in handles["fp32"].keys()}
    weights.check_fits(stored, engine.shapes, source.parent, ReshardError, FIT_ADVICE)

    def read(state: str, name: str, p) -> torch.Tensor:
        view = handles[state].get_slice(name)
        return weights.read_shard(lambda index: view[index], view.get_shape(), p)

    engine.load_full_state(read, float(meta["step"] or 0.0))
    return meta


def main(argv=None) -> None:
    from pretrain.errors import user_errors

    parser = argparse.ArgumentParser(prog="python -m pretrain.checkpoint.reshard", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run dir, its checkpoints dir, or a tag dir")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest intact one)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with user_errors("reshard", debug=args.debug):
        ckpt_dir, tag = manifest.find(args.checkpoint, args.tag)
        out = convert(Path(ckpt_dir) / tag)
    meta = json.loads((out / META).read_text())
    print(f"wrote {out} (saved at {meta['layout']}, step {meta['train_state'].get('step')})")


if __name__ == "__main__":
    main()
