"""Stopping after k steps and resuming reproduces the uninterrupted run exactly (fp32), in the same
run directory or, with checkpoint.resume=PATH, in a new one."""

import pytest

from harness import FAST, run_jobs

pytestmark = pytest.mark.distributed

COMMON = FAST + [
    "data=synthetic", "model=tiny-llama", "model.hidden_size=64", "model.hidden_dropout=0.1",
    "trainer.max_steps=8", "trainer.seq_length=32", "trainer.global_batch_size=8",
    "optim.warmup_tokens=256", "optim.ramp_start_batch=4", "optim.ramp_tokens=512",
]


def _jobs(tag, layout, ckpt_dir):
    jobs = {
        f"{tag}-full": COMMON + layout,
        f"{tag}-first": COMMON + layout + ["checkpoint.stop_after=4", "checkpoint.save_final=true", f"checkpoint.dir={ckpt_dir}"],
    }
    if tag == "single":
        # A new run (its own run dir and checkpoints) started from the first run's checkpoint
        # directory by name; it runs before -rest, so that directory still ends at step 4.
        jobs[f"{tag}-named"] = COMMON + layout + [f"checkpoint.resume={ckpt_dir}", "checkpoint.save_final=true"]
    jobs[f"{tag}-rest"] = COMMON + layout + [f"checkpoint.dir={ckpt_dir}"]
    return jobs


LAYOUTS = {
    1: {"single": ["parallel=single", "trainer.micro_batch_size=4"]},
    2: {
        "dp2_zero2": ["parallel=dp2_zero2", "trainer.micro_batch_size=2"],
        "pp2": ["parallel=pp2", "trainer.micro_batch_size=2"],
    },
}


_launches = {}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """(work dir, {job: metrics}) of the one launch at a world size; each job's run dir is WORK/JOB."""

    def get(world: int):
        if world not in _launches:
            work = tmp_path_factory.mktemp(f"world{world}")
            jobs = {}
            for tag, layout in LAYOUTS[world].items():
                jobs.update(_jobs(tag, layout, work / f"ckpt-{tag}"))
            _launches[world] = work, run_jobs(world, jobs, work)
        return _launches[world]

    return get


def _assert_continues(full, part, tag):
    """``part`` reproduces the uninterrupted run's steps it covers (fp32: to 1e-6)."""
    by_step = {r["step"]: r for r in full}
    for b in part:
        a = by_step[b["step"]]
        assert a["tokens"] == b["tokens"]
        assert a["lr"] == b["lr"]
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (tag, a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * abs(a["grad_norm"]), (tag, a["step"])
        for key in ("gns/g2_ema", "gns/trace_ema"):  # the noise-scale smoothing carries over too
            assert (key in a) == (key in b)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), (tag, a["step"], key)


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_resume_continues_the_uninterrupted_run(world, launched):
    _, results = launched(world)
    for tag in LAYOUTS[world]:
        full, first, rest = (results[f"{tag}-{part}"] for part in ("full", "first", "rest"))
        assert [r["step"] for r in first] == [1, 2, 3, 4]
        assert [r["step"] for r in rest] == [5, 6, 7, 8], "the second run must start where the first stopped"
        assert [r["batch_size"] for r in full] == [r["batch_size"] for r in first + rest]
        assert full[0]["batch_size"] < full[-1]["batch_size"], "the batch ramp should be exercised"
        _assert_continues(full, first + rest, tag)
        if "dp2" in tag:  # dp == 1 under a pipeline has no small batch to measure
            assert any("gns/g2_ema" in r for r in rest), "the noise scale should be measured after the resume"


def test_resume_from_a_named_checkpoint_directory_of_another_run(launched):
    """checkpoint.resume=PATH: a new run directory starts from the newest checkpoint in PATH (another
    run's, at step 4), continues as the uninterrupted run would, and saves into its own directory,
    leaving PATH as it was."""
    work, results = launched(1)
    full, named = results["single-full"], results["single-named"]
    assert [r["step"] for r in named] == [5, 6, 7, 8], "the new run must start at the named checkpoint's step"
    _assert_continues(full, named, "named")
    assert (work / "single-named" / "checkpoints" / "latest").read_text() == "step00000008"
    source = work / "ckpt-single"
    assert (source / "latest").read_text() == "step00000004"
    assert sorted(p.name for p in source.iterdir()) == ["latest", "step00000004"], "nothing written to PATH"
    assert any("gns/g2_ema" in r for r in named), "the noise scale should be measured after the resume"
