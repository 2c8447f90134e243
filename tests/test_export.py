"""Export to transformers from checkpoints of every layout, import back, and generate.

One module-scoped fixture trains tiny GPT-2- and LLaMA-style models for 2 steps at single, tp2,
pp2, dp2 ZeRO-3 and tp2_pp2, plus bf16 runs (three torchrun launches). The checks that need megatron-core run in one
subprocess (``python tests/test_export.py check WORKDIR``) so that this pytest process never
creates process groups.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import FAST, REPO, child_env, run_jobs

pytestmark = pytest.mark.distributed

COMMON = FAST + [
    "logging.wandb=false", "data=synthetic", "trainer.max_steps=2", "trainer.seq_length=32",
    "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "checkpoint.save_final=true",
    "model.num_layers=2", "model.hidden_size=64", "optim.warmup_tokens=0",
]
MODELS = {"gpt": ["model=tiny-gpt"], "llama": ["model=tiny-llama"]}
LAYOUTS = {1: ["single"], 2: ["tp2", "pp2", "dp2_zero3"], 4: ["tp2_pp2"]}


def _save_transformers_models(root: Path) -> dict:
    """Random tiny transformers models (every weight perturbed away from 0 and 1), saved as safetensors."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    models = {
        "gpt": GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                          bos_token_id=None, eos_token_id=None)),
        "llama": LlamaForCausalLM(LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
        )),
    }
    dirs = {}
    for name, model in models.items():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("export")
    originals = _save_transformers_models(work / "transformers")
    for world, layouts in LAYOUTS.items():
        jobs = {f"{m}-{l}": COMMON + MODELS[m] + [f"parallel={l}"] for m in MODELS for l in layouts}
        # bf16: export must take the fp32 masters (ZeRO-2/3 partitions, BF16_Optimizer's at ZeRO-1).
        if world == 2:
            jobs["bf16-llama-dp2_zero2"] = COMMON + MODELS["llama"] + ["parallel=dp2_zero2", "trainer.precision=bf16"]
            jobs["bf16-gpt-dp2_zero3"] = COMMON + MODELS["gpt"] + ["parallel=dp2_zero3", "trainer.precision=bf16"]
        if world == 1:
            jobs["bf16-llama-single"] = COMMON + MODELS["llama"] + ["parallel=single", "trainer.precision=bf16"]
            # A run with a real tokenizer (data=tiny: a few seconds of data prep).
            jobs["gpt-tok"] = COMMON + MODELS["gpt"] + ["parallel=single", "data=tiny", "model.vocab_size=null"]
            # "Train 0 steps" from transformers weights: one step at lr 1e-30 changes no fp32 weight.
        if world in (1, 4):
            # "Train 0 steps" from transformers weights: one step at lr 1e-30 changes no fp32 weight.
            for m in MODELS:
                jobs[f"import-{m}-{layouts[-1]}"] = COMMON + MODELS[m] + [
                    f"parallel={layouts[-1]}", f"model.init_from={originals[m]}", "optim.lr=1e-30", "trainer.max_steps=1"
                ]
        run_jobs(world, jobs, work / "runs")
    proc = subprocess.run(
        [sys.executable, __file__, "check", str(work)], env=child_env(), capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        raise AssertionError(f"check worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return work, json.loads((work / "results.json").read_text())


def test_transformers_logits_match_ours(work):
    _, results = work
    for name, r in results["logits"].items():
        assert r["max_rel"] <= 1e-4, (name, r)


def test_every_layout_consolidates_to_the_single_process_weights(work):
    _, results = work
    expected = {f"{m}-{l}" for m in MODELS for layouts in LAYOUTS.values() for l in layouts if l != "single"}
    assert set(results["vs_single"]) == expected
    for name, rel in results["vs_single"].items():
        # Layouts match step for step to ~1e-6 (test_parity); a wrong TP gather would be O(1) off.
        assert rel <= 1e-4, (name, rel)


def test_bf16_export_takes_the_fp32_masters(work):
    _, results = work
    assert sorted(results["bf16_masters_not_bf16"]) == ["bf16-gpt-dp2_zero3", "bf16-llama-dp2_zero2", "bf16-llama-single"]
    assert all(results["bf16_masters_not_bf16"].values()), results["bf16_masters_not_bf16"]


def test_exported_tokenizer_encodes_like_ours(work):
    _, results = work
    assert results["tokenizer"]["hf"] == results["tokenizer"]["ours"]
    assert len(results["tokenizer"]["ours"]) > 3


def test_import_of_export_round_trips_exactly(work):
    _, results = work
    assert results["round_trip"] == {name: True for name in results["logits"]}


def test_transformers_weights_round_trip_through_training_exactly(work):
    from safetensors.torch import load_file

    path, _ = work
    for m in MODELS:
        original = load_file(str(path / "transformers" / m / "model.safetensors"))
        for layout in ("single", "tp2_pp2"):  # imported into one process and into a TP x PP layout
            exported = load_file(str(path / "hf" / f"import-{m}-{layout}" / "model.safetensors"))
            assert sorted(exported) == sorted(original), (m, layout)
            for k in original:
                assert torch_equal(exported[k], original[k]), (m, layout, k)


def torch_equal(a, b):
    import torch

    return a.shape == b.shape and bool(torch.equal(a.float(), b.float()))


def _model_cfg(name: str):
    from omegaconf import OmegaConf

    from pretrain.config import ModelConfig

    values = OmegaConf.load(REPO / f"pretrain/conf/model/{name}.yaml")
    values.pop("defaults")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), values)


def test_init_from_refuses_a_model_that_does_not_fit(tmp_path):
    from omegaconf import OmegaConf

    from pretrain.interop.import_hf import HFImportError, check_compatible, from_hf

    imported, _ = from_hf(_save_transformers_models(tmp_path)["llama"])
    configured = _model_cfg("tiny-llama")
    with pytest.raises(HFImportError, match=r"model\.hidden_size=128 \(checkpoint: 64\)"):
        check_compatible(configured, imported)
    check_compatible(OmegaConf.merge(configured, {"hidden_size": 64, "num_layers": 2, "vocab_size": 512}), imported)


def test_export_refuses_a_tokenizer_larger_than_the_model(tmp_path):
    from tokenizers import Tokenizer, models

    from pretrain.interop.export import ExportError, save_tokenizer

    vocab = {f"t{i}": i for i in range(600)}
    vocab["<|endoftext|>"] = 600
    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>")).save(str(path))
    with pytest.raises(ExportError, match="601 tokens but the model only 512"):
        save_tokenizer(str(path), tmp_path / "out", "<|endoftext|>", 512)


def test_generation_with_and_without_cache_and_transformers_agree(work):
    _, results = work
    for name, g in results["generate"].items():
        assert g["cached"] == g["uncached"], name
        assert g["cached"] == g["hf"], name
        assert g["sampled_again"] == g["sampled"], name  # seeded


def test_unsupported_settings_are_refused_by_name():
    from omegaconf import OmegaConf

    from pretrain.interop.export import ExportError, _family

    base = _model_cfg("tiny-llama")
    cases = {
        "model.parallel_block": {"parallel_block": True},
        "model.local_window": {"local_window": 8, "local_attention_layers": "odd"},
        "model.activation=gelu": {"activation": "gelu"},
    }
    for knob, change in cases.items():
        with pytest.raises(ExportError, match=knob.replace(".", r"\.")):
            _family(OmegaConf.merge(base, change))
    gpt = _model_cfg("tiny-gpt")
    with pytest.raises(ExportError, match=r"model\.num_kv_heads"):
        _family(OmegaConf.merge(gpt, {"num_kv_heads": 2}))


# ---------------------------------------------------------------------------------------------
# The worker: runs in a subprocess (it creates a one-process group for our model).


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def check(work: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from pretrain.interop import export
    from pretrain.interop import generate
    from pretrain.interop import import_hf

    torch.manual_seed(0)
    results = {"logits": {}, "vs_single": {}, "round_trip": {}, "generate": {}, "bf16_masters_not_bf16": {}}
    canonical = {}
    for run in sorted((work / "runs").iterdir()):
        if not (run / "config.yaml").is_file():
            continue
        name = run.name
        out = work / "hf" / name
        export.export(str(run), str(out))
        cfg, ckpt_dir, tag = export.locate(str(run))
        sd = export.consolidate(ckpt_dir, tag)
        canonical[name] = sd
        if name.startswith("bf16"):
            results["bf16_masters_not_bf16"][name] = any(bool((t != t.bfloat16().float()).any()) for t in sd.values())
        ours = generate.build_inference_model(cfg.model, sd)
        hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 24))
        with torch.no_grad():
            a = ours.logits(tokens).transpose(0, 1).float()  # (b, s, vocab)
            b = hf(tokens).logits.float()
        results["logits"][name] = {"max_rel": float((a - b).abs().max() / b.abs().max()), "norm_rel": _rel(a, b)}
        m2, sd2 = import_hf.from_hf(out)
        results["round_trip"][name] = sorted(sd2) == sorted(sd) and all(torch.equal(sd2[k], sd[k]) for k in sd)
        if name.endswith("-single") or name == "gpt-tok":
            prompt = tokens[:1, :5]
            hf.generation_config.eos_token_id = None  # ours runs the full 12 tokens too
            hf.generation_config.pad_token_id = 0
            greedy = dict(max_new_tokens=12, vocab_size=cfg.model.vocab_size)
            g = {
                "cached": generate.generate(ours, prompt, **greedy).tolist(),
                "uncached": generate.generate(ours, prompt, use_cache=False, **greedy).tolist(),
                "hf": hf.generate(prompt, max_new_tokens=12, do_sample=False).tolist(),
                "sampled": generate.generate(ours, prompt, 12, 0.9, 20, 0.9, seed=3).tolist(),
                "sampled_again": generate.generate(ours, prompt, 12, 0.9, 20, 0.9, seed=3).tolist(),
            }
            results["generate"][name] = g
        if name == "gpt-tok":
            text = "It is a truth universally acknowledged, that a single man\ndef f(x): return {x: 1}"
            from tokenizers import Tokenizer

            theirs = PreTrainedTokenizerFast.from_pretrained(out, local_files_only=True)
            results["tokenizer"] = {
                "ours": Tokenizer.from_file(export.tokenizer_file(cfg)).encode(text, add_special_tokens=False).ids,
                "hf": theirs.encode(text, add_special_tokens=False),
            }
    for name, sd in canonical.items():
        model, _, layout = name.partition("-")
        base = f"{model}-single"
        if layout != "single" and layout in {l for ls in LAYOUTS.values() for l in ls} and base in canonical:
            ref = canonical[base]
            # Matrices one by one (a wrong TP gather is O(1) off in that tensor); all tensors together
            # (near-zero biases are noise-dominated after Adam steps, see CPU_NOTES).
            matrices = max(_rel(sd[k], ref[k]) for k in sd if sd[k].ndim == 2)
            total = (sum(float((sd[k] - ref[k]).pow(2).sum()) for k in sd) / sum(float(ref[k].pow(2).sum()) for k in sd)) ** 0.5
            results["vs_single"][name] = max(matrices, total)
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if sys.argv[1] == "check":
        check(Path(sys.argv[2]))
