"""End to end: the real data pipeline, the command line, torchrun, and what a run leaves behind."""

import json
import math

import pytest

from harness import FAST, run_jobs, run_train

pytestmark = pytest.mark.distributed


def test_gpt2_and_llama_style_models_learn_the_builtin_corpus(tmp_path):
    common = ["data=tiny", "trainer.max_steps=60", "trainer.progress_bar=false", "logging.plot=false",
              "trainer.eval_interval=0"]
    results = run_jobs(1, {m: common + [f"model={m}"] for m in ("tiny-gpt", "tiny-llama")}, tmp_path)
    for model, records in results.items():
        config = (tmp_path / model / "config.yaml").read_text()
        vocab = int(next(line for line in config.splitlines() if line.strip().startswith("vocab_size:")).split(":")[1])
        start = math.log(vocab)
        assert abs(records[0]["loss"] - start) < 0.3, f"{model}: first loss {records[0]['loss']} should be ~ln(V)={start:.2f}"
        final = sum(r["loss"] for r in records[-5:]) / 5
        assert final < start - 1.0, f"{model}: loss only fell from {start:.2f} to {final:.2f}"


def test_torchrun_four_processes_tp2_pp2_leaves_a_complete_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    run_train(
        ["parallel=tp2_pp2", "data=tiny", "trainer.max_steps=4", "trainer.micro_batch_size=4",
         "trainer.global_batch_size=8", "trainer.seq_length=64", "trainer.eval_interval=2",
         "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, nproc=4,
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, r)
    assert [r["tokens"] for r in records] == [8 * 64 * s for s in (1, 2, 3, 4)]
    assert "val_loss" in records[1] and "val_loss" in records[3]
    assert "tensor: 2" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000004"


def test_third_party_warnings_go_to_the_run_log_not_the_terminal(tmp_path):
    """megatron-core warns that Transformer Engine and Apex are missing, once per import site and process,
    and DeepSpeed logs INFO blocks: by default they land in train.log; logging.verbose=true shows them."""
    common = ["data=synthetic", "model=tiny-gpt", "trainer.max_steps=1", "trainer.progress_bar=false",
              "logging.plot=false", "logging.wandb=false", "checkpoint.save_final=false"]
    quiet = run_train(common + [f"hydra.run.dir={tmp_path / 'quiet'}"], cwd=tmp_path)
    loud = run_train(common + ["logging.verbose=true", f"hydra.run.dir={tmp_path / 'loud'}"], cwd=tmp_path)
    terminal = quiet.stdout + quiet.stderr
    for chatter in ("Warning:", "warnings.warn", "][megatron.", "[INFO] ["):  # the last: DeepSpeed's format
        assert chatter not in terminal, f"{chatter!r} on the terminal:\n{terminal[-3000:]}"
    assert "model tiny-gpt:" in terminal  # the run summary stays
    loud_terminal = loud.stdout + loud.stderr
    if "Transformer Engine and Apex are not installed" in loud_terminal:  # a machine without them
        assert "Transformer Engine and Apex are not installed" in (tmp_path / "quiet" / "train.log").read_text()
    assert "Warning:" in loud_terminal or "[INFO] [" in loud_terminal, loud_terminal[-3000:]
