"""Checkpoints are committed atomically with a manifest; a damaged or half-written newest one is
reported and skipped, and the resumed run still reproduces the uninterrupted one (fp32, exact)."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from harness import FAST, child_env

pytestmark = pytest.mark.distributed

TINY = FAST + [
    "data=synthetic", "model=tiny-gpt", "model.hidden_size=64", "trainer.seq_length=32",
    "trainer.micro_batch_size=2", "trainer.global_batch_size=2", "trainer.max_steps=6",
    "logging.wandb=false", "checkpoint.interval=2",
]


def _run(tmp_path, name, *extra, check=True, env=None):
    cmd = [sys.executable, "-m", "pretrain.train", *TINY, f"hydra.run.dir={tmp_path / name}", *extra]
    proc = subprocess.run(cmd, env={**child_env(), **(env or {})}, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _losses(run_dir) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def _intact(tag_dir) -> bool:
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    return all(
        hashlib.sha256((tag_dir / name).read_bytes()).hexdigest() == entry["sha256"]
        for name, entry in manifest["files"].items()
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run keeping every checkpoint (steps 2, 4, 6)."""
    tmp = tmp_path_factory.mktemp("reference")
    _run(tmp, "run", "checkpoint.keep_last=0")
    return tmp / "run"


def test_checkpoints_are_committed_with_a_manifest(reference):
    ckpts = reference / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step00000002", "step00000004", "step00000006"]
    assert (ckpts / "latest").read_text() == "step00000006"
    for tag in ("step00000002", "step00000004", "step00000006"):
        assert _intact(ckpts / tag), tag
        assert (ckpts / tag / "rng" / "rank00000.pt").is_file()
    manifest = json.loads((ckpts / "step00000004" / "manifest.json").read_text())
    assert manifest["train_state"]["step"] == 4 and manifest["world_size"] == 1


def test_crash_during_a_save_leaves_the_previous_checkpoint_loadable(reference, tmp_path):
    proc = _run(tmp_path, "run", check=False, env={"PRETRAIN_TEST_FAULTS": "crash_in_save=4"})
    assert proc.returncode == 86, proc.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000002"
    assert not (ckpts / "step00000004").exists(), "a half-written checkpoint must never carry a step name"

    proc = _run(tmp_path, "run")  # keep_last=2 by default
    assert "at step 2" in proc.stdout + proc.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step00000004", "step00000006"], "stale .tmp cleared, keep-last 2"
    resumed, full = _losses(tmp_path / "run"), _losses(reference)
    for step in (3, 4, 5, 6):
        assert resumed[step] == full[step], step


def test_damaged_checkpoints_are_reported_and_skipped(reference, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(reference / "checkpoints", ckpts)
    newest = ckpts / "step00000006" / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    middle = ckpts / "step00000004" / "mp_rank_00_model_states.pt"
    data = bytearray(middle.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    middle.write_bytes(bytes(data))

    proc = _run(tmp_path, "run", "checkpoint.keep_last=0")
    out = proc.stdout + proc.stderr
    assert "step00000006 is damaged or incomplete and is skipped: mp_rank_00_model_states.pt has" in out
    assert "step00000004 is damaged or incomplete and is skipped: mp_rank_00_model_states.pt does not match its checksum" in out
    assert "at step 2" in out
    resumed, full = _losses(tmp_path / "run"), _losses(reference)
    assert sorted(resumed) == [3, 4, 5, 6]
    for step in resumed:
        assert resumed[step] == full[step], step


def test_no_intact_checkpoint_stops_with_a_clear_error(reference, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step00000002", ckpts / "step00000002")
    (ckpts / "step00000002" / "manifest.json").unlink()
    proc = _run(tmp_path, "run", check=False)
    assert proc.returncode != 0
    assert "no checkpoint in" in proc.stderr and "checkpoint.resume=never" in proc.stderr
