"""No code runs from a checkpoint, and no command reads a damaged one.

A planted pickle payload (one that would create a marker file) in each kind of file a checkpoint
holds, with the manifest rewritten to match as an attacker would: resume, export, generate and
reshard each exit 2 naming the file, and the marker never appears. A byte-flipped or truncated
newest checkpoint: the commands fall back to the previous one and say so, or, when that one is
named, refuse it naming the file.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import FAST, child_env

pytestmark = pytest.mark.distributed

TINY = FAST + [
    "data=synthetic", "model=tiny-gpt", "model.hidden_size=64", "trainer.seq_length=32",
    "trainer.micro_batch_size=2", "trainer.global_batch_size=2", "trainer.max_steps=4",
    "checkpoint.interval=2", "checkpoint.keep_last=0",
]
NEWEST, PREVIOUS = "step00000004", "step00000002"


def _python(args, cwd, nproc=1, timeout=300):
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run([sys.executable, *args], env=child_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def _train(run_dir, *extra, nproc=1):
    return _python(["-m", "pretrain.train", *TINY, f"hydra.run.dir={run_dir}", *extra], run_dir.parent, nproc)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Checkpoints at steps 2 and 4 of: a bf16 run (model states, ZeRO optimizer partition, RNG files)
    and a 2-stage pipeline run (per-layer weight files)."""
    root = tmp_path_factory.mktemp("safety")
    for name, extra, nproc in (("bf16", ["trainer.precision=bf16", "parallel.zero_stage=1"], 1),
                               ("pp2", ["parallel=pp2"], 2)):
        proc = _train(root / name, *extra, nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return root


class Payload:
    """Unpickling this calls os.system: what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _rewrite_manifest(tag_dir: Path) -> None:
    """Make the manifest match the files again, as whoever supplies a checkpoint can."""
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (tag_dir / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (tag_dir / "manifest.json").write_text(json.dumps(manifest))


def _plant(run: Path, pattern: str, marker: Path) -> str:
    """Replace the newest checkpoint's first file matching ``pattern`` with a payload; its name."""
    tag_dir = run / "checkpoints" / NEWEST
    target = sorted(tag_dir.glob(pattern))[0]
    original = torch.load(target, weights_only=False)
    if isinstance(original, dict):  # keep the file's keys: only the payload is foreign
        original["payload"] = Payload(marker)
        torch.save(original, target)
    else:
        torch.save({"payload": Payload(marker)}, target)
    _rewrite_manifest(tag_dir)
    return target.name


# (source run, file pattern, commands that read that file)
KINDS = {
    "model_states": ("bf16", "mp_rank_00_model_states.pt", ("resume", "export", "generate", "reshard")),
    "optimizer_partition": ("bf16", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", ("resume", "export", "generate", "reshard")),
    "rng": ("bf16", "rng/rank00000.pt", ("resume",)),
    "pipeline_layer": ("pp2", "layer_01-model_00-model_states.pt", ("resume", "export", "generate", "reshard")),
}


def _command(command: str, run: Path, tmp: Path, source: str):
    if command == "resume":  # at the run's own layout for the bf16 run; the pp2 run resumes resharded
        extra = ["trainer.precision=bf16", "parallel.zero_stage=1"] if source == "bf16" else []
        return _train(run, "trainer.max_steps=6", *extra)
    if command == "export":
        return _python(["-m", "pretrain.interop.export", str(run), str(tmp / "hf")], tmp)
    if command == "generate":
        return _python(["-m", "pretrain.interop.generate", str(run), "--prompt-ids", "1,2", "--max-new-tokens", "2"], tmp)
    return _python(["-m", "pretrain.checkpoint.reshard", str(run)], tmp)


def test_the_payload_would_run_without_the_safe_loader(runs, tmp_path):
    """The planted file is live: an unsafe torch.load of it creates the marker (so the tests below can fail)."""
    run = tmp_path / "bf16"
    shutil.copytree(runs / "bf16", run)
    marker = tmp_path / "marker"
    name = _plant(run, "mp_rank_00_model_states.pt", marker)
    torch.load(run / "checkpoints" / NEWEST / name, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_planted_payload_is_refused_by_every_command(runs, tmp_path, kind):
    source, pattern, readers = KINDS[kind]
    run = tmp_path / source
    shutil.copytree(runs / source, run)
    marker = tmp_path / "marker"
    name = _plant(run, pattern, marker)
    for command in readers:  # the others never open this file (RNG states matter to a resume only)
        proc = _command(command, run, tmp_path, source)
        assert not marker.exists(), f"{command} ran the payload in {name}"
        assert "Traceback" not in proc.stderr, f"{command}:\n{proc.stderr[-3000:]}"
        assert proc.returncode == 2, f"{command} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        assert name in proc.stderr and "refused to load" in proc.stderr, f"{command}:\n{proc.stderr[-3000:]}"
        assert "posix.system" in proc.stderr, proc.stderr[-3000:]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["byte_flip", "truncated"])
def test_a_damaged_newest_checkpoint_falls_back_or_is_refused(runs, tmp_path, damage):
    run = tmp_path / "bf16"
    shutil.copytree(runs / "bf16", run)
    damage(run / "checkpoints" / NEWEST / "mp_rank_00_model_states.pt")

    export = _python(["-m", "pretrain.interop.export", str(run), str(tmp_path / "hf")], tmp_path)
    assert export.returncode == 0, export.stderr[-3000:]
    assert f"checkpoint {run / 'checkpoints' / NEWEST} is damaged" in export.stderr
    assert "mp_rank_00_model_states.pt" in export.stderr and f"using {run / 'checkpoints' / PREVIOUS}" in export.stderr
    # The export holds the step-2 weights, bit for bit.
    from safetensors.torch import load_file
    from pretrain.interop.export import consolidate

    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    previous = consolidate(run / "checkpoints", PREVIOUS)
    assert torch.equal(exported["transformer.wte.weight"], previous["embed.word.weight"])

    reshard = _python(["-m", "pretrain.checkpoint.reshard", str(run)], tmp_path)
    assert reshard.returncode == 0 and f"{PREVIOUS}/universal" in reshard.stdout, reshard.stderr[-3000:]
    generate = _python(["-m", "pretrain.interop.generate", str(run), "--prompt-ids", "1,2", "--max-new-tokens", "2"], tmp_path)
    assert generate.returncode == 0 and "is damaged" in generate.stderr, generate.stderr[-3000:]

    for args in (["-m", "pretrain.interop.export", str(run / "checkpoints" / NEWEST), str(tmp_path / "hf2")],
                 ["-m", "pretrain.checkpoint.reshard", str(run), "--tag", NEWEST],
                 ["-m", "pretrain.interop.generate", str(run / "checkpoints" / NEWEST), "--prompt-ids", "1"]):
        named = _python(args, tmp_path)
        assert named.returncode == 2, (args, named.stderr[-3000:])
        assert "mp_rank_00_model_states.pt" in named.stderr and "Traceback" not in named.stderr, named.stderr[-3000:]
    assert not (tmp_path / "hf2").exists()


def test_a_damaged_universal_folder_is_converted_again(runs, tmp_path):
    run = tmp_path / "bf16"
    shutil.copytree(runs / "bf16", run)
    first = _python(["-m", "pretrain.checkpoint.reshard", str(run)], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    universal = run / "checkpoints" / NEWEST / "universal"
    good = (universal / "fp32.safetensors").read_bytes()
    _flip(universal / "fp32.safetensors")
    again = _python(["-m", "pretrain.checkpoint.reshard", str(run)], tmp_path)
    assert again.returncode == 0 and "is damaged" in again.stderr, again.stderr[-3000:]
    assert (universal / "fp32.safetensors").read_bytes() == good


def test_nothing_outside_safeload_unpickles():
    """Every load of checkpoint content goes through pretrain/checkpoint/safeload.py (a static check of the sources)."""
    import re

    from harness import REPO

    unsafe = re.compile(r"torch\.load\(|pickle\.loads?\(|weights_only\s*=\s*False|yaml\.load\(|yaml\.unsafe_load")
    found = [f"{path.relative_to(REPO)}:{n}" for folder in ("pretrain", "kernels") for path in (REPO / folder).rglob("*.py")
             if path.name != "safeload.py" for n, line in enumerate(path.read_text().splitlines(), 1) if unsafe.search(line)]
    assert not found, found
    assert "weights_only=True" in (REPO / "pretrain" / "checkpoint" / "safeload.py").read_text()
