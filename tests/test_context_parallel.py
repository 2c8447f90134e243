"""Context parallelism (``parallel.context``) reproduces the single process, composes with TP (and
sequence parallelism), PP and ZeRO 1-3, keeps the noise-scale tap right, reshards its checkpoints, and
halves the activations each rank keeps.

Training jobs: tiny-llama (RoPE, GQA) and tiny-gpt (learned positions, banded attention on odd
layers) at sequence 512, 10 steps, fp32 to 1e-5 relative and bf16 to the 2e-2 the other bf16
parity tests use. Three torchrun launches (world 4, 2, 1); a resumed job always runs after its source.
"""

import json
import os

import pytest
import torch

from harness import FAST, assert_close, run_jobs, series, two_ranks

pytestmark = pytest.mark.distributed

STEPS = 10
COMMON = FAST + [
    "data=synthetic", f"trainer.max_steps={STEPS}", "trainer.seq_length=512", "trainer.global_batch_size=4",
    "optim.warmup_tokens=0", "trainer.seed=7", "logging.gns=true", "model.max_position_embeddings=512",
]
MODELS = {
    "llama": ["model=tiny-llama", "model.hidden_size=64"],
    "gpt": ["model=tiny-gpt", "model.hidden_size=64", "model.local_window=96", "model.local_attention_layers=odd"],
    # Packed documents: a 64-token vocabulary puts an end-of-text (id 0) every ~64 tokens, across chunks.
    "docs": ["model=tiny-llama", "model.hidden_size=64", "data.tokenizer.vocab_size=64", "model.document_mask=true",
             "model.eod_token_id=0"],
}
# layout -> (world size, overrides); pipelines get 2 micro-batches.
LAYOUTS = {
    "single": (1, ["parallel=single", "trainer.micro_batch_size=4"]),
    "cp2": (2, ["parallel=cp2", "trainer.micro_batch_size=4"]),
    "cp2_selective": (2, ["parallel=cp2", "trainer.micro_batch_size=4", "parallel.activation_checkpointing=selective"]),
    # dp == 1: ZeRO partitions over the two context ranks alone.
    "cp2_zero2": (2, ["parallel=cp2", "parallel.zero_stage=2", "trainer.micro_batch_size=4"]),
    "cp2_zero3": (2, ["parallel=cp2", "parallel.zero_stage=3", "trainer.micro_batch_size=4"]),
    "tp2_cp2": (4, ["parallel=tp2_cp2", "trainer.micro_batch_size=4"]),
    "tp2_sp_cp2": (4, ["parallel=tp2_cp2", "parallel.sequence_parallel=true", "trainer.micro_batch_size=4"]),
    "pp2_cp2": (4, ["parallel=pp2_cp2", "trainer.micro_batch_size=2"]),
    "cp2_dp2_zero1": (4, ["parallel=cp2_dp2_zero1", "trainer.micro_batch_size=2"]),
}
# model -> layouts it runs at (fp32); bf16 runs at BF16_LAYOUTS for llama.
RUNS = {
    "llama": ["single", "cp2", "cp2_selective", "cp2_zero2", "cp2_zero3", "tp2_cp2", "tp2_sp_cp2", "pp2_cp2", "cp2_dp2_zero1"],
    "gpt": ["single", "cp2", "tp2_cp2"],
    "docs": ["single", "cp2", "tp2_cp2"],
}
BF16_LAYOUTS = ["single", "cp2", "tp2_cp2"]
# DP rank 0's share of each batch (samples 0-1), for the local-gradient tap under cp2_dp2.
HALF_BATCH = ["parallel=single", "trainer.micro_batch_size=2", "trainer.global_batch_size=2"]

# Resharding: a cp2 run checkpoints at step 5 and goes on; its steps 6-10 are the uninterrupted
# reference for the same checkpoint resumed at cp1 and at tp2 (and a cp2 x dp2 ZeRO-1 one at cp1).
SOURCES = {
    "cp2": (2, MODELS["llama"] + LAYOUTS["cp2"][1]),
    "cp2_dp2_zero1": (4, MODELS["llama"] + LAYOUTS["cp2_dp2_zero1"][1]),
}
TARGETS = {  # target -> (source, world size, overrides)
    "cp2-to-single": ("cp2", 1, MODELS["llama"] + LAYOUTS["single"][1]),
    "cp2-to-tp2": ("cp2", 2, MODELS["llama"] + ["parallel=tp2", "trainer.micro_batch_size=4"]),
    "cp2_dp2_zero1-to-single": ("cp2_dp2_zero1", 1, MODELS["llama"] + LAYOUTS["single"][1]),
}
RESUME_AT = 5


def _jobs(world: int, root) -> dict:
    jobs = {}
    for model, layouts in RUNS.items():
        for layout in layouts:
            size, args = LAYOUTS[layout]
            if size != world:
                continue
            jobs[f"{model}-{layout}-fp32"] = COMMON + MODELS[model] + args
            if model == "llama" and layout in BF16_LAYOUTS:
                jobs[f"{model}-{layout}-bf16"] = COMMON + MODELS[model] + args + ["trainer.precision=bf16"]
    if world == 1:
        jobs["llama-half-fp32"] = COMMON + MODELS["llama"] + HALF_BATCH
        jobs["docs-unmasked-fp32"] = COMMON + MODELS["docs"] + LAYOUTS["single"][1] + ["model.document_mask=false"]
    for name, (size, args) in SOURCES.items():  # sources before targets: jobs run in order
        if size == world:
            jobs[f"source-{name}"] = COMMON + args + [f"checkpoint.dir={root / 'ckpt' / name}",
                                                      f"checkpoint.interval={RESUME_AT}", "checkpoint.keep_last=0"]
    for name, (source, size, args) in TARGETS.items():
        if size == world:
            step = root / "ckpt" / source / f"step{RESUME_AT:08d}"
            jobs[f"target-{name}"] = COMMON + args + [f"checkpoint.dir={root / 'ckpt' / name}",
                                                      f"checkpoint.resume={step}"]
    return jobs


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("context")
    out = {}
    for world in (4, 2, 1):
        out.update(run_jobs(world, _jobs(world, root), root / f"world{world}", timeout=1800))
    return out






FP32 = [(model, layout) for model, layouts in RUNS.items() for layout in layouts if layout != "single"]


@pytest.mark.parametrize("model, layout", FP32)
def test_fp32_context_parallel_matches_single_process(results, model, layout):
    reference = results[f"{model}-single-fp32"]
    got = results[f"{model}-{layout}-fp32"]
    assert len(reference) == STEPS
    assert_close(series(got, "loss"), series(reference, "loss"), 1e-5, f"{model} {layout} loss")
    assert_close(series(got, "grad_norm"), series(reference, "grad_norm"), 1e-5, f"{model} {layout} grad norm")


@pytest.mark.parametrize("layout", [name for name in BF16_LAYOUTS if name != "single"])
def test_bf16_context_parallel_matches_single_process(results, layout):
    reference = results["llama-single-bf16"]
    got = results[f"llama-{layout}-bf16"]
    assert_close(series(got, "loss"), series(reference, "loss"), 2e-2, f"bf16 {layout} loss")
    assert_close(series(got, "grad_norm"), series(reference, "grad_norm"), 2e-2, f"bf16 {layout} grad norm")


def test_documents_cross_the_chunks(results):
    """The document-masked parity is not vacuous: on the same data, masking changes the run."""
    masked, unmasked = series(results["docs-single-fp32"], "loss"), series(results["docs-unmasked-fp32"], "loss")
    assert max(abs(a - b) / abs(b) for a, b in zip(masked, unmasked)) > 1e-3, (masked, unmasked)


@pytest.mark.parametrize("layout", ["cp2", "cp2_zero2", "cp2_zero3", "tp2_cp2", "tp2_sp_cp2", "pp2_cp2"])
def test_local_gradient_tap_is_the_whole_sequences_gradient(results, layout):
    """dp == 1: the tap (averaged over the context group) is the step's whole gradient, every step."""
    records = results[f"llama-{layout}-fp32"]
    assert_close(series(records, "grad_norm_local"), series(records, "grad_norm"), 1e-5, f"{layout} local grad")


def test_local_gradient_tap_under_cp2_dp2(results):
    """cp2 x dp2: DP rank 0's tap is exactly its half of the batch over whole sequences (step 1)."""
    got = results["llama-cp2_dp2_zero1-fp32"][0]
    half = results["llama-half-fp32"][0]["grad_norm"]
    assert_close([got["grad_norm_local"]], [half], 1e-5, "cp2_dp2 local grad (rank 0's half)")
    assert abs(got["grad_norm_local"] - got["grad_norm"]) > 1e-3 * half, "local must differ from global"
    assert (got["gns/b_small"], got["gns/b_big"]) == (2, 4)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_context_parallel_checkpoint_reshards(results, target):
    source = TARGETS[target][0]
    reference = results[f"source-{source}"][RESUME_AT:]
    got = results[f"target-{target}"]
    assert [r["step"] for r in got] == list(range(RESUME_AT + 1, STEPS + 1)), "resumed after the checkpoint's step"
    assert_close(series(got, "loss"), series(reference, "loss"), 1e-5, f"{target} loss")
    assert_close(series(got, "grad_norm"), series(reference, "grad_norm"), 1e-5, f"{target} grad norm")


# ---------------------------------------------------------------------------------------------------
# Activation memory: bytes saved for backward per rank, one tiny-llama forward at sequence 2048.

SEQ = 2048


def _saved_bytes(model, tokens) -> int:
    """Bytes of distinct non-parameter tensors the forward keeps for backward."""
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, tokens)
    loss.backward()
    return sum(seen.values())


def _measure(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain.config import ModelConfig, ParallelConfig
    from pretrain.engine import compat
    from pretrain.engine.groups import GroupMismatch, check_agreement
    from pretrain.model.gpt import build_model
    from pretrain.model.init import apply_init

    compat.apply()
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = ModelConfig(name="tiny-llama", num_layers=4, hidden_size=128, num_attention_heads=4, num_kv_heads=2,
                      norm="rmsnorm", position_embedding="rope", activation="swiglu", bias=False,
                      tie_embeddings=False, vocab_size=512, max_position_embeddings=SEQ)
    tokens = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(0))
    results = {}
    for cp in (1, 2):
        parallel_state.initialize_model_parallel(context_parallel_size=cp)
        check_agreement(ParallelConfig(context=cp, data=2 // cp))
        for wrong in (ParallelConfig(context=2 // cp, data=cp), ParallelConfig(tensor=2)):  # not what was built
            try:
                check_agreement(wrong)
            except GroupMismatch as err:
                results.setdefault("mismatches", []).append(str(err))
        model = build_model(cfg, ParallelConfig(context=cp, data=2 // cp)).train()
        apply_init(model, cfg, seed=3)
        results[f"cp{cp}"] = _saved_bytes(model, tokens)
        parallel_state.destroy_model_parallel()
    gathered = [None, None]
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(os.path.join(out_dir, "saved.json"), "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()




@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Per rank: saved bytes at cp1 and cp2, and the group mismatches ``check_agreement`` reported."""
    return two_ranks(_measure, tmp_path_factory.mktemp("cp_memory"))


def test_cp2_halves_the_activations_each_rank_keeps(measured):
    print(measured)
    for rank, saved in enumerate(measured):
        ratio = saved["cp1"] / saved["cp2"]
        assert ratio >= 1.8, f"rank {rank}: cp1 keeps {saved['cp1']} bytes, cp2 {saved['cp2']} (only {ratio:.2f}x)"


def test_group_disagreement_is_caught_at_start_up(measured):
    """The groups built agree with DeepSpeed's topology; a topology of another layout is refused."""
    for rank, saved in enumerate(measured):
        mismatches = saved["mismatches"]
        assert len(mismatches) == 4, mismatches  # two wrong layouts at each of cp1 and cp2
        assert all(f"rank {rank}:" in m for m in mismatches), mismatches


# ---------------------------------------------------------------------------------------------------
# Configuration and groups.

@pytest.mark.parametrize("overrides, message", [
    (["parallel=cp2", "trainer.seq_length=102"], "not divisible by 2 x parallel.context = 4"),
    (["parallel=tp2_cp2", "parallel.tensor=3", "parallel.sequence_parallel=true", "trainer.seq_length=44"],
     "22 tokens per context rank is not divisible by parallel.tensor=3"),
    (["parallel=cp2", "model.attention_dropout=0.1"], "ring attention has no attention dropout"),
    (["parallel=cp2", "model.hidden_size=96"], "head dim 24 with parallel.context=2"),
    (["parallel=cp2"], "parallel.context = 1*1*1*2 = 2, but 1 process(es) were launched"),
])
def test_bad_context_parallel_configs_are_named(overrides, message):
    from hydra import compose, initialize_config_dir

    from pretrain.config import register_configs, world_size
    from pretrain.validate import ConfigError, validate
    from harness import REPO

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "pretrain" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["data=synthetic", "model=tiny-llama", *overrides])
    world = 1 if "1 process(es)" in message else world_size(cfg.parallel)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        validate(cfg, world)
