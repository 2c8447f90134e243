"""IsoFLOP sweeps (pretrain.sweep): planning, validation before launch, and one smoke sweep end to end.

(1) The smoke sweep, 3 budgets x 2 micro shapes on synthetic data, from one command: every run
directory records N, D, C (sweep.json) and its final validation loss, trained exactly its planned
steps with the learning rate warmed up and decayed to its floor at its own last step, and the sweep
directory holds fit.json and the three PNGs. (2) The dry-run table: D = C / (6 N) with N counted
independently, steps = ceil(D / batch tokens), the schedule's end = the run's end; the shipped
configs' dry runs launch and write nothing. (3) Bad sweep configs stop before launch, naming the
problem: unknown keys, budgets too small for a step, derived keys in train, too few runs to fit, a
layout the launcher cannot run.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO, child_env
from pretrain.errors import UserError
from pretrain.scaling.__main__ import read_run
from pretrain.sweep.config import load
from pretrain.sweep.plan import plan

SMOKE = """
name: smoke
budgets: [4.0e8, 8.0e8, 1.6e9]
shapes:
  - {num_layers: 1, hidden_size: 32, num_attention_heads: 2}
  - {num_layers: 2, hidden_size: 32, num_attention_heads: 2}
train: [data=synthetic, model=tiny-gpt, model.max_position_embeddings=64, trainer.seq_length=32,
        trainer.micro_batch_size=4, trainer.global_batch_size=4, trainer.eval_iters=2, optim.lr=1e-2,
        trainer.progress_bar=false, logging.plot=false, logging.gns=false, logging.wandb=false,
        checkpoint.save_final=false]
warmup_fraction: 0.1
fit: {bootstrap: 8, seed: 0, starts: 8, bootstrap_starts: 2}
"""


def _sweep_file(tmp_path: Path, text: str = SMOKE, **replace) -> Path:
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def _sweep(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "pretrain.sweep", *map(str, args)], env=child_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_smoke_sweep_records_every_run_and_fits(tmp_path):
    out = tmp_path / "out"
    proc = _sweep(_sweep_file(tmp_path), f"dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert len(points) == 6 and {p["budget"] for p in points} == {4e8, 8e8, 1.6e9}
    for point in points:
        run = out / point["name"]
        record = json.loads((run / "sweep.json").read_text())
        assert {"N", "D", "C", "budget", "steps"} <= record.keys()
        assert record["C"] == 6 * record["N"] * record["D"]
        assert record["budget"] <= record["C"] < record["budget"] + 6 * record["N"] * record["batch_tokens"]
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = metrics[-1]
        assert last["step"] == record["steps"] and last["tokens"] == record["D"]
        assert record["result"]["val_loss"] == last["val_loss"] > 0
        assert [m["step"] for m in metrics if "val_loss" in m] == [record["steps"]]  # evaluated at its end
        # Warmup over 10% of the run's tokens, cosine to lr x min_lr_ratio (0.1) at its last step.
        assert metrics[0]["lr"] < 1e-2 and math.isclose(last["lr"], 1e-3, rel_tol=1e-6)
        assert max(m["lr"] for m in metrics) <= 1e-2 * (1 + 1e-9)
        # The fit reads the same N and D from the run directory.
        seen = read_run(run)
        assert (seen["N"], seen["D"]) == (record["N"], record["D"])
    fit = json.loads((out / "fit.json").read_text())
    assert len(fit["runs"]) == 6 and {"a_exp", "b_exp"} <= fit["optimum"].keys()
    assert all((out / name).stat().st_size > 0 for name in ("isoflop.png", "frontier.png", "optimal.png"))


def test_dry_run_table_derives_tokens_steps_and_schedule(tmp_path):
    sweep, _ = load(str(_sweep_file(tmp_path)), [])
    points = plan(sweep)
    assert [p.name for p in points][:2] == ["C4e8-L1-h32-a2", "C4e8-L2-h32-a2"]
    for p in points:
        layers = int(p.shape.split("-")[0][1:])
        assert p.N == layers * 12 * 32 * 32  # attention 4 h^2 + GELU MLP 8 h^2 per block
        assert p.D_target == p.budget / (6 * p.N)
        assert p.batch_tokens == 4 * 32 and p.steps == math.ceil(p.D_target / p.batch_tokens)
        assert p.D == p.steps * p.batch_tokens == p.decay_tokens >= p.D_target
        assert p.warmup_tokens == round(0.1 * p.D)


def test_framework_flop_rule_uses_the_framework_count(tmp_path):
    from pretrain.config import ModelConfig
    from pretrain.flops import model_flops_per_token

    sweep, _ = load(str(_sweep_file(tmp_path)), ["flops=framework"])
    p = plan(sweep)[0]
    model = ModelConfig(name="x", num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=512)
    assert p.flops_per_token == model_flops_per_token(model, 32, 512) and p.D_target == p.budget / p.flops_per_token


@pytest.mark.parametrize("config", ["pretrain/conf/sweep/isoflop-cpu.yaml", "isoflop-gpt"])
def test_shipped_sweeps_dry_run(tmp_path, config):
    extra = ["launcher_settings.partition=gpu", "data.root=/data"] if config == "isoflop-gpt" else []
    proc = _sweep(REPO / config if config.endswith(".yaml") else config, f"dir={tmp_path / 'sweep'}", *extra,
                  "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert " 9 runs" in proc.stdout or " 15 runs" in proc.stdout
    assert "-m pretrain.train --multirun" in proc.stdout and "+sweep_point=" in proc.stdout
    assert not (tmp_path / "sweep").exists()  # nothing launched, nothing written


BAD = [
    ({"name: smoke": "name: smoke\nbudget: 3"}, "unknown key 'budget'"),
    ({"{num_layers: 1,": "{num_layer: 1,"}, r"shapes\[0\]\.num_layer: not a model setting"),
    ({"[4.0e8, 8.0e8, 1.6e9]": "[1.0e5, 8.0e8, 1.6e9]"}, r"C=1e\+05 x shape L1-h32-a2: D = C / 6N = 1.356 tokens.*below one step"),
    ({"name: smoke": "name: smoke\nmin_steps: 30"}, r"C=4e\+08 x shape L2-h32-a2: .*below min_steps=30"),
    ({"data=synthetic,": "data=synthetic, trainer.max_steps=5,"}, "train: trainer.max_steps is set by the sweep"),
    ({"[4.0e8, 8.0e8, 1.6e9]": "[4.0e8, 8.0e8]"}, "4 runs: the fitted law has 5 parameters"),
    ({"data=synthetic,": "data=synthetic, parallel=dp2,"}, "basic launcher runs each point in one process"),
    ({"data=synthetic,": "data=synthetic, optim.ramp_start_batch=2,"}, "batch-size ramp"),
    ({"name: smoke": "name: smoke\nflops: 6N"}, "flops='6N': one of 6ND, framework"),
    ({"[4.0e8, 8.0e8, 1.6e9]": "[4.0e8, -2.0, 1.6e9]"}, r"budgets\[1\]=-2.0: a budget is a positive number"),
]


@pytest.mark.parametrize("replace,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_sweeps_are_refused_before_launch(tmp_path, replace, message):
    with pytest.raises(UserError, match=message):
        plan(load(str(_sweep_file(tmp_path, **replace)), [])[0])


def test_cli_reports_bad_sweep_with_exit_2(tmp_path):
    proc = _sweep(_sweep_file(tmp_path), "fit.bootsrap=3", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("sweep: error:") and "bootsrap" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _sweep("no-such-sweep", cwd=tmp_path)
    assert proc.returncode == 2 and "shipped: isoflop-cpu, isoflop-gpt" in proc.stderr
