"""Parallel layouts reproduce the single-process run: same initial weights, same data, same
per-step losses and gradient norms (fp32 to 1e-5 relative, bf16 to 2e-2)."""

import math

import pytest

from harness import FAST, run_jobs

pytestmark = pytest.mark.distributed

MODELS = {
    # GPT-2/3 style: LayerNorm, learned positions, GELU, biases, tied embeddings, MHA, and GPT-3's
    # locally banded attention on odd layers.
    "gpt": ["model=tiny-gpt", "model.hidden_size=64", "model.local_window=16", "model.local_attention_layers=odd"],
    # LLaMA style: RMSNorm, RoPE, SwiGLU, no biases, untied embeddings, GQA (4 query / 2 KV heads).
    "llama": ["model=tiny-llama", "model.hidden_size=64"],
}
COMMON = FAST + [
    "data=synthetic", "trainer.max_steps=5", "trainer.seq_length=64", "trainer.global_batch_size=8",
    "optim.warmup_tokens=0", "trainer.seed=7", "logging.gns=true",
]
# layout name -> (world size, overrides). Micro-batches are chosen so pipelines run >= 2 micro-batches.
LAYOUTS = {
    "single": (1, ["parallel=single", "trainer.micro_batch_size=8"]),
    "single_acc4": (1, ["parallel=single", "trainer.micro_batch_size=2"]),
    "single_ckpt_full": (1, ["parallel=single", "trainer.micro_batch_size=8", "parallel.activation_checkpointing=full"]),
    "single_ckpt_every2": (1, ["parallel=single", "trainer.micro_batch_size=8",
                               "parallel.activation_checkpointing=every", "parallel.checkpoint_every=2"]),
    "tp2": (2, ["parallel=tp2", "trainer.micro_batch_size=8"]),
    "tp2_sp": (2, ["parallel=tp2_sp", "trainer.micro_batch_size=8"]),
    "tp2_sp_ckpt": (2, ["parallel=tp2_sp", "trainer.micro_batch_size=8", "parallel.activation_checkpointing=full"]),
    "pp2": (2, ["parallel=pp2", "trainer.micro_batch_size=4"]),
    "dp2_zero1": (2, ["parallel=dp2_zero1", "trainer.micro_batch_size=4"]),
    "dp2_zero2": (2, ["parallel=dp2_zero2", "trainer.micro_batch_size=4"]),
    "dp2_zero3": (2, ["parallel=dp2_zero3", "trainer.micro_batch_size=4"]),
    "tp2_pp2": (4, ["parallel=tp2_pp2", "trainer.micro_batch_size=4"]),
    "tp2_dp2_zero1": (4, ["parallel=tp2_dp2_zero1", "trainer.micro_batch_size=4"]),
    "pp2_dp2_zero1": (4, ["parallel=pp2_dp2_zero1", "trainer.micro_batch_size=4"]),
}
# DP rank 0's share of the first batch (samples 0-3), for checking the local-gradient tap.
HALF_BATCH = ["parallel=single", "trainer.micro_batch_size=4", "trainer.global_batch_size=4"]
BF16_LAYOUTS = ["single", "tp2", "pp2", "dp2_zero2", "dp2_zero3"]


# PaLM style: multi-query attention (one KV head, so no TP) and the parallel attention + MLP block.
PALM = ["model=tiny-palm", "model.hidden_size=64"]
PALM_LAYOUTS = ["single", "pp2", "dp2_zero2"]


def _jobs(world: int) -> dict:
    jobs = {}
    for layout in PALM_LAYOUTS:
        size, args = LAYOUTS[layout]
        if size == world:
            jobs[f"palm-{layout}-fp32"] = COMMON + PALM + args
    for model, model_args in MODELS.items():
        for layout, (size, args) in LAYOUTS.items():
            if size == world:
                jobs[f"{model}-{layout}-fp32"] = COMMON + model_args + args
                if layout in BF16_LAYOUTS:
                    jobs[f"{model}-{layout}-bf16"] = COMMON + model_args + args + ["trainer.precision=bf16"]
        if world == 1:
            jobs[f"{model}-half-fp32"] = COMMON + model_args + HALF_BATCH
    return jobs


_results = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    def get(world: int) -> dict:
        if world not in _results:
            _results[world] = run_jobs(world, _jobs(world), tmp_path_factory.mktemp(f"world{world}"), timeout=1500)
        return _results[world]

    return get


def _series(records, key):
    return [r[key] for r in records]


def _assert_close(got, want, rtol, what):
    assert len(got) == len(want), f"{what}: {len(got)} steps vs {len(want)}"
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert math.isfinite(g), f"{what} step {step}: {g}"
        assert abs(g - w) <= rtol * abs(w), f"{what} step {step}: {g} vs reference {w} (rel {abs(g - w) / abs(w):.2e})"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "single"])
def test_fp32_layout_matches_single_process(results, model, layout):
    reference = results(1)[f"{model}-single-fp32"]
    got = results(LAYOUTS[layout][0])[f"{model}-{layout}-fp32"]
    assert len(reference) == 5
    _assert_close(_series(got, "loss"), _series(reference, "loss"), 1e-5, f"{layout} loss")
    _assert_close(_series(got, "grad_norm"), _series(reference, "grad_norm"), 1e-5, f"{layout} grad norm")


@pytest.mark.parametrize("layout", [name for name in PALM_LAYOUTS if name != "single"])
def test_palm_style_layout_matches_single_process(results, layout):
    reference = results(1)["palm-single-fp32"]
    got = results(LAYOUTS[layout][0])[f"palm-{layout}-fp32"]
    _assert_close(_series(got, "loss"), _series(reference, "loss"), 1e-5, f"palm {layout} loss")
    _assert_close(_series(got, "grad_norm"), _series(reference, "grad_norm"), 1e-5, f"palm {layout} grad norm")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("layout", [name for name in BF16_LAYOUTS if name != "single"])
def test_bf16_layout_matches_single_process(results, model, layout):
    reference = results(1)[f"{model}-single-bf16"]
    got = results(LAYOUTS[layout][0])[f"{model}-{layout}-bf16"]
    _assert_close(_series(got, "loss"), _series(reference, "loss"), 2e-2, f"bf16 {layout} loss")
    _assert_close(_series(got, "grad_norm"), _series(reference, "grad_norm"), 2e-2, f"bf16 {layout} grad norm")


@pytest.mark.parametrize("model", MODELS)
def test_bf16_tracks_fp32(results, model):
    """bf16 compute with fp32 master weights stays near the fp32 trajectory over a few steps."""
    bf16 = _series(results(1)[f"{model}-single-bf16"], "loss")
    fp32 = _series(results(1)[f"{model}-single-fp32"], "loss")
    _assert_close(bf16, fp32, 2e-2, "bf16 vs fp32 loss")


def test_training_makes_progress(results):
    for model in MODELS:
        losses = _series(results(1)[f"{model}-single-fp32"], "loss")
        assert losses[-1] < losses[0], f"{model}: loss did not fall in 5 steps: {losses}"


def _data_parallel(layout):
    return "dp2" in layout


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_local_gradient_tap(results, model, layout):
    """The pre-reduction gradient of DP rank 0: the whole step's gradient when dp == 1 (every
    step, through accumulation and any ZeRO stage), and exactly its own half of the batch when
    dp == 2 (step 1, where the weights are still identical)."""
    world = LAYOUTS[layout][0]
    for precision, rtol in (("fp32", 1e-5), ("bf16", 2e-2)):
        records = results(world).get(f"{model}-{layout}-{precision}")
        if records is None:
            continue
        if _data_parallel(layout):
            half = results(1)[f"{model}-half-fp32"][0]["grad_norm"]
            _assert_close([records[0]["grad_norm_local"]], [half], rtol, f"{precision} {layout} local grad (rank 0's half)")
            assert abs(records[0]["grad_norm_local"] - records[0]["grad_norm"]) > 1e-3 * half, "local must differ from global"
        else:
            _assert_close(_series(records, "grad_norm_local"), _series(records, "grad_norm"), rtol, f"{precision} {layout} local grad")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("layout", ["dp2_zero2", "dp2_zero3", "tp2_dp2_zero1", "pp2_dp2_zero1"])
def test_noise_scale_is_the_same_on_every_data_parallel_layout(results, model, layout):
    """Step 1 (same weights, same batch, same local shares): |G|^2 and tr(Sigma) as on plain dp2."""
    plain = results(2)[f"{model}-dp2_zero1-fp32"][0]
    got = results(LAYOUTS[layout][0])[f"{model}-{layout}-fp32"][0]
    assert (got["gns/b_small"], got["gns/b_big"]) == (plain["gns/b_small"], plain["gns/b_big"]) == (4, 8)
    # Both estimates are differences of nearly equal norms: compare on the scale of those norms.
    scale = plain["grad_norm_local"] ** 2
    for key in ("gns/g2", "gns/trace"):
        tolerance = 1e-4 * scale * (1 if key == "gns/g2" else 8)
        assert abs(got[key] - plain[key]) <= tolerance, (key, got[key], plain[key])
