"""Stopping after k steps and resuming reproduces the uninterrupted run exactly (fp32)."""

import pytest

from harness import FAST, run_jobs

pytestmark = pytest.mark.distributed

COMMON = FAST + [
    "data=synthetic", "model=tiny-llama", "model.hidden_size=64", "model.hidden_dropout=0.1",
    "trainer.max_steps=8", "trainer.seq_length=32", "trainer.global_batch_size=8",
    "optim.warmup_tokens=256", "optim.ramp_start_batch=4", "optim.ramp_tokens=512",
]


def _jobs(tag, layout, ckpt_dir):
    return {
        f"{tag}-full": COMMON + layout,
        f"{tag}-first": COMMON + layout + ["checkpoint.stop_after=4", "checkpoint.save_final=true", f"checkpoint.dir={ckpt_dir}"],
        f"{tag}-rest": COMMON + layout + [f"checkpoint.dir={ckpt_dir}"],
    }


LAYOUTS = {
    1: {"single": ["parallel=single", "trainer.micro_batch_size=4"]},
    2: {
        "dp2_zero2": ["parallel=dp2_zero2", "trainer.micro_batch_size=2"],
        "pp2": ["parallel=pp2", "trainer.micro_batch_size=2"],
    },
}


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_resume_continues_the_uninterrupted_run(world, tmp_path):
    jobs = {}
    for tag, layout in LAYOUTS[world].items():
        jobs.update(_jobs(tag, layout, tmp_path / f"ckpt-{tag}"))
    results = run_jobs(world, jobs, tmp_path)
    for tag in LAYOUTS[world]:
        full, first, rest = (results[f"{tag}-{part}"] for part in ("full", "first", "rest"))
        assert [r["step"] for r in first] == [1, 2, 3, 4]
        assert [r["step"] for r in rest] == [5, 6, 7, 8], "the second run must start where the first stopped"
        assert [r["batch_size"] for r in full] == [r["batch_size"] for r in first + rest]
        assert full[0]["batch_size"] < full[-1]["batch_size"], "the batch ramp should be exercised"
        for a, b in zip(full, first + rest):
            assert a["tokens"] == b["tokens"]
            assert a["lr"] == b["lr"]
            assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (tag, a["step"], a["loss"], b["loss"])
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * abs(a["grad_norm"]), (tag, a["step"])
            for key in ("gns/g2_ema", "gns/trace_ema"):  # the noise-scale smoothing carries over too
                assert (key in a) == (key in b)
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), (tag, a["step"], key)
        if "dp2" in tag:  # dp == 1 under a pipeline has no small batch to measure
            assert any("gns/g2_ema" in r for r in rest), "the noise scale should be measured after the resume"
