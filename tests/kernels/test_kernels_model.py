"""The training model with its Triton kernels forced (interpreter) trains exactly like the PyTorch path.

Runs pretrain's own decoder (RMSNorm, rotary, GQA attention with a locally banded layer) in a
subprocess per backend pair, so TRITON_INTERPRET and the forced backend apply from the start.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import FAST, run_jobs  # noqa: E402

ARGS = FAST + [
    "data=synthetic", "data.tokenizer.vocab_size=128", "model=tiny-llama", "model.hidden_size=64",
    "model.num_layers=2", "model.local_window=8", "model.local_attention_layers=odd",
    "trainer.max_steps=3", "trainer.seq_length=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
    "optim.warmup_tokens=0", "optim.lr=3e-3",
]


def test_model_with_triton_kernels_matches_pytorch_path(tmp_path):
    results = run_jobs(
        1,
        {"sdpa": ARGS + ["model.attention_backend=sdpa"], "triton": ARGS + ["model.attention_backend=triton"]},
        tmp_path,
        env={"TRITON_INTERPRET": "1", "PRETRAIN_KERNELS_BACKEND": "triton"},
    )
    reference = [r["loss"] for r in results["sdpa"]]
    triton = [r["loss"] for r in results["triton"]]
    assert len(triton) == 3 and len(set(reference)) == 3  # the weights moved between steps
    for step, (a, b) in enumerate(zip(triton, reference), start=1):
        assert abs(a - b) <= 1e-5 * abs(b), (step, triton, reference)
    grads = [(r["grad_norm"], s["grad_norm"]) for r, s in zip(results["triton"], results["sdpa"])]
    for a, b in grads:
        assert abs(a - b) <= 1e-5 * abs(b), grads
