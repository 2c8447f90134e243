"""A checkpoint saved at one layout resumes at another, optimizer state included, and the run goes on
as if it had never stopped.

Each source run trains 6 steps and checkpoints at step 3 without stopping: its steps 4-6 are the
uninterrupted reference. A copy of its step-3 checkpoint is then resumed at each target layout
(three torchrun launches: world 4, 2, 1; a target's source always runs in an earlier launch).
"""

import json
import shutil

import pytest

from harness import FAST, run_jobs, run_train

pytestmark = pytest.mark.distributed

COMMON = FAST + [
    "data=synthetic", "trainer.max_steps=6", "trainer.seq_length=32", "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2", "model.num_layers=4", "model.hidden_size=64", "optim.warmup_tokens=256",
    "checkpoint.interval=3", "checkpoint.keep_last=0",
]
MODELS = {"gpt": ["model=tiny-gpt"], "llama": ["model=tiny-llama"]}  # tied embeddings; SwiGLU + GQA
BF16 = ["trainer.precision=bf16"]

# source job -> (world size, overrides)
SOURCES = {
    "gpt-tp2_pp2": (4, MODELS["gpt"] + ["parallel=tp2_pp2"]),
    "llama-tp2_pp2": (4, MODELS["llama"] + ["parallel=tp2_pp2"]),
    "llama-dp2_zero2": (2, MODELS["llama"] + ["parallel=dp2_zero2"]),
    "llama-dp2_zero2-bf16": (2, MODELS["llama"] + ["parallel=dp2_zero2"] + BF16),
}
# resumed job -> (source, world size, overrides, relative tolerance)
TARGETS = {
    "gpt-tp2_pp2-to-tp2": ("gpt-tp2_pp2", 2, MODELS["gpt"] + ["parallel=tp2"], 1e-5),
    "gpt-tp2_pp2-to-pp2": ("gpt-tp2_pp2", 2, MODELS["gpt"] + ["parallel=pp2"], 1e-5),
    "gpt-tp2_pp2-to-dp2_zero1": ("gpt-tp2_pp2", 2, MODELS["gpt"] + ["parallel=dp2_zero1"], 1e-5),
    "gpt-tp2_pp2-to-dp2_zero3": ("gpt-tp2_pp2", 2, MODELS["gpt"] + ["parallel=dp2_zero3"], 1e-5),
    "llama-tp2_pp2-to-tp2": ("llama-tp2_pp2", 2, MODELS["llama"] + ["parallel=tp2"], 1e-5),
    "llama-tp2_pp2-to-pp2": ("llama-tp2_pp2", 2, MODELS["llama"] + ["parallel=pp2"], 1e-5),
    "llama-tp2_pp2-to-dp2_zero1": ("llama-tp2_pp2", 2, MODELS["llama"] + ["parallel=dp2_zero1"], 1e-5),
    "gpt-tp2_pp2-to-single": ("gpt-tp2_pp2", 1, MODELS["gpt"] + ["parallel=single"], 1e-5),
    "llama-tp2_pp2-to-single": ("llama-tp2_pp2", 1, MODELS["llama"] + ["parallel=single"], 1e-5),
    "llama-dp2_zero2-to-single": ("llama-dp2_zero2", 1, MODELS["llama"] + ["parallel=single"], 1e-5),
    # bf16 ZeRO-2 partitions into DeepSpeed's BF16_Optimizer (ZeRO-1 with fp32 accumulation).
    "llama-dp2_zero2-bf16-to-single": ("llama-dp2_zero2-bf16", 1, MODELS["llama"] + ["parallel=single"] + BF16, 1e-2),
}


def _ckpt(root, name):
    return root / "ckpt" / name


def _copy_step3(root, source, target):
    """A checkpoint dir holding only the source's step-3 checkpoint."""
    src, dst = _ckpt(root, source), _ckpt(root, target)
    dst.mkdir(parents=True)
    shutil.copytree(src / "step00000003", dst / "step00000003")
    (dst / "latest").write_text("step00000003")
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    results = {}
    for world in (4, 2, 1):
        jobs = {}
        for name, (w, overrides) in SOURCES.items():
            if w == world:
                jobs[name] = COMMON + overrides + [f"checkpoint.dir={_ckpt(root, name)}"]
        for name, (source, w, overrides, _) in TARGETS.items():
            if w == world:
                jobs[name] = COMMON + overrides + [f"checkpoint.dir={_copy_step3(root, source, name)}"]
        results.update(run_jobs(world, jobs, root / f"world{world}"))
    return root, results


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_resharded_resume_continues_the_uninterrupted_run(runs, target):
    root, results = runs
    source, _, _, tol = TARGETS[target]
    reference = [r for r in results[source] if r["step"] > 3]
    resumed = results[target]
    assert [r["step"] for r in resumed] == [4, 5, 6], "the resumed run must start after the checkpoint"
    for a, b in zip(reference, resumed):
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        assert b["loss"] == pytest.approx(a["loss"], rel=tol), (target, a["step"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=tol), (target, a["step"])
    assert (_ckpt(root, target) / "step00000003" / "universal" / "meta.json").is_file()


def test_the_universal_form_records_the_source(runs):
    root, _ = runs
    meta = json.loads((_ckpt(root, "llama-dp2_zero2-to-single") / "step00000003" / "universal" / "meta.json").read_text())
    assert meta["layout"] == {"tensor": 1, "pipeline": 1, "data": 2, "context": 1, "zero_stage": 2, "precision": "fp32"}
    assert meta["train_state"]["step"] == 3 and meta["step"] == 3


@pytest.mark.parametrize("saved_at", ["another layout", "the same layout"])
def test_a_checkpoint_of_another_model_is_refused_by_name(runs, tmp_path, saved_at):
    root, _ = runs
    if saved_at == "another layout":
        ckpt = _copy_step3(root, "llama-tp2_pp2", "wrong-model")
    else:  # the single-process run's own checkpoints (its final one is at the single layout)
        ckpt = tmp_path / "ckpt"
        shutil.copytree(_ckpt(root, "llama-dp2_zero2-to-single"), ckpt)
    proc = run_train(COMMON + MODELS["llama"] + ["parallel=single", "model.hidden_size=96", f"checkpoint.dir={ckpt}"],
                     tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stdout + proc.stderr
    assert "does not fit the configured model" in err
    assert "blocks.0.attn.qkv.weight has shape [128, 64] in the checkpoint but [192, 96] in the model" in err, err[-3000:]


def test_the_command_line_converts_a_run_once(runs):
    import subprocess
    import sys

    from harness import child_env

    root, _ = runs
    run = _ckpt(root, "llama-tp2_pp2")  # its 'latest' is the final step 6
    cmd = [sys.executable, "-m", "pretrain.checkpoint.reshard", str(run)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((run / "step00000006" / "universal" / "meta.json").read_text())
    assert meta["layout"]["tensor"] == 2 and meta["layout"]["pipeline"] == 2 and meta["train_state"]["step"] == 6
    proc = subprocess.run([sys.executable, "-m", "pretrain.checkpoint.reshard", str(root)], env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no checkpoints here" in proc.stderr and "Traceback" not in proc.stderr


def test_adam_step_goes_where_the_optimizer_keeps_it():
    """torch keeps Adam's step per parameter state; apex's FusedAdam (the GPU default) per group."""
    import torch

    from pretrain.checkpoint.saved import _group_step
    from pretrain.engine.full_state import _set_step

    p = torch.nn.Parameter(torch.zeros(3))
    torch_adam = torch.optim.AdamW([p])
    _set_step(torch_adam, torch_adam.state[p], p, 7)
    assert float(torch_adam.state[p]["step"]) == 7.0 and "step" not in torch_adam.param_groups[0]
    torch_adam.state[p].update(exp_avg=torch.zeros(3), exp_avg_sq=torch.zeros(3))
    p.grad = torch.ones(3)
    torch_adam.step()
    assert _group_step(torch_adam.state_dict(), float(torch_adam.state[p]["step"])) == 8.0

    FusedAdam = type("FusedAdam", (torch.optim.AdamW,), {"__module__": "apex.optimizers.fused_adam"})
    apex_like = FusedAdam([p])
    _set_step(apex_like, {}, p, 7)
    assert apex_like.param_groups[0]["step"] == 7
    assert _group_step(apex_like.state_dict(), None) == 7.0
