"""Training-step throughput beside Hugging Face transformers, in one process, on the same batches.

    python -m pretrain.bench.step [--steps N] [hydra overrides]
    python -m pretrain.bench.step model=tiny-llama data.tokenizer.vocab_size=8192

Builds this framework's model as configured, through the trainer's own build order (``train.build``:
groups, model, init, activation checkpointing, ``model.compile``, the DeepSpeed engine; single process),
and transformers' GPT2LMHeadModel or LlamaForCausalLM of identical shape, twice: eager, and whole under
``torch.compile`` (``--no-hf-compile`` leaves that one out). Steps alternate between them (forward,
backward, clip, AdamW) so machine noise hits all alike; prints the median tokens/s of each, their
ratios, achieved model FLOP/s against this machine's measured matmul FLOP/s, and memory: peak
allocated CUDA memory of a step on a GPU; on CPU, where one process's peak is shared by all three,
the peak bytes of tensors saved for backward and alive at once (saved-tensor hooks; weights not
counted), which is what differs.

Ours at its best on CPU: ``model.compile=true model.fused_loss=true`` (see the README's throughput table).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig, compose_training, typed
from pretrain.engine import compat, groups
from pretrain.errors import UserError, user_errors
from pretrain.flops import measured_matmul_flops
from pretrain.model.gpt import padded_vocab_size
from pretrain.model.layers import ffn_hidden_size, head_dim
from pretrain.train.build import build_run
from pretrain.validate import validate


def hf_model(cfg: ModelConfig, vocab: int) -> torch.nn.Module:
    """transformers' model of the same shape; refuses knob combinations it has no class for."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    kv = cfg.num_kv_heads or cfg.num_attention_heads
    if (cfg.norm, cfg.position_embedding, cfg.activation) == ("layernorm", "learned", "gelu") and kv == cfg.num_attention_heads:
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers, n_head=cfg.num_attention_heads, n_inner=ffn_hidden_size(cfg),
            bos_token_id=None, eos_token_id=None, activation_function="gelu_new", resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout,
            attn_pdrop=cfg.attention_dropout, layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        ))
    if (cfg.norm, cfg.position_embedding, cfg.activation) == ("rmsnorm", "rope", "swiglu"):
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=ffn_hidden_size(cfg),
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads, num_key_value_heads=kv,
            head_dim=head_dim(cfg), max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.bias, mlp_bias=cfg.bias,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, bos_token_id=None, eos_token_id=None,
        ))
    raise UserError(
        f"model {cfg.name}: norm={cfg.norm}, positions={cfg.position_embedding}, activation={cfg.activation} "
        "matches neither GPT2LMHeadModel nor LlamaForCausalLM; pick a GPT-2- or LLaMA-style model"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each model first")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (model=..., trainer.seq_length=...)")
    parser.add_argument("--no-hf-compile", action="store_true", help="leave out transformers under torch.compile")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    with user_errors("bench.step", debug=args.debug):
        _run(args)


def _run(args) -> None:
    overrides = ["data=synthetic", f"trainer.max_steps={args.warmup + args.steps}", *args.overrides,
                 # Timed as the trainer runs it, less what only a real run needs.
                 "checkpoint.resume=never", "logging.gns=false"]
    cfg = compose_training(overrides, "the benchmark's overrides")
    validate(cfg, world_size=1)
    with tempfile.TemporaryDirectory() as run_dir:
        run = build_run(typed(cfg), Path(run_dir), logging_on=False)
        try:
            _compare(args, run)
        finally:
            groups.shutdown()


def _compare(args, run) -> None:
    cfg, tr = run.config, run.config.trainer
    ours = run.engine
    vocab = padded_vocab_size(run.model_config)
    theirs = hf_model(run.model_config, vocab).to(compat.device())
    theirs.train()
    per_step = tr.global_batch_size
    steps = {"pretrain": ours.train_step, "transformers": _hf_step(theirs, cfg)}
    if not args.no_hf_compile:
        twin = hf_model(run.model_config, vocab).to(compat.device())
        twin.load_state_dict(theirs.state_dict())
        twin.train()
        steps["transformers-compiled"] = _hf_step(torch.compile(twin), cfg, params=twin.parameters())

    times = {name: [] for name in steps}
    memory = {}
    for step in range(args.warmup + args.steps):
        micro = run.batches(run.train_data, step * per_step, per_step)
        for name, fn in steps.items():
            if step == args.warmup:  # a steady-state step, compiled graphs already built
                memory[name] = _memory_of(fn, micro)
                continue
            start = time.perf_counter()
            fn(micro)
            if compat.cuda_available():
                torch.cuda.synchronize()
            if step > args.warmup:
                times[name].append(time.perf_counter() - start)

    tokens = per_step * tr.seq_length
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    flops_per_token = run.flops_per_token
    peak = measured_matmul_flops(device=compat.device().type)
    n_params = sum(p.numel() for p in theirs.parameters())
    what = "peak allocated MiB" if compat.cuda_available() else "saved for bwd MiB"
    print(f"model {cfg.model.name} ({n_params / 1e6:.2f}M params), batch {per_step} x {tr.seq_length} tokens, "
          f"{args.steps - 1} timed steps each, interleaved, {tr.precision}; model.compile={cfg.model.compile}, "
          f"model.fused_loss={cfg.model.fused_loss}")
    print(f"{'':22}{'tokens/s':>12}{'model TFLOP/s':>16}{'of matmul peak':>16}{what:>20}")
    for name in steps:
        achieved = rate[name] * flops_per_token
        print(f"{name:22}{rate[name]:12.0f}{achieved / 1e12:16.4f}{achieved / peak:16.1%}{memory[name] / 2**20:20.1f}")
    for name in steps:
        if name != "pretrain":
            print(f"ratio pretrain / {name}: {rate['pretrain'] / rate[name]:.3f}")
    print(f"measured matmul peak: {peak / 1e12:.4f} TFLOP/s; model FLOPs per token: {flops_per_token:,}")


def _hf_step(model, cfg, params=None):
    params = list(model.parameters() if params is None else params)
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)

    def step(micro):
        for tokens, labels in micro:
            logits = model(input_ids=tokens).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1)) / len(micro)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _memory_of(step, micro) -> int:
    """Bytes: peak allocated CUDA memory of one step, or on CPU the bytes saved for backward."""
    if compat.cuda_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(micro)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    live = {"now": 0, "peak": 0, "seen": set()}

    def release(key, size):
        live["seen"].discard(key)
        live["now"] -= size

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape), t.storage_offset())
        if not (t.is_leaf and t.requires_grad) and key not in live["seen"]:  # weights are not activations;
            size = t.numel() * t.element_size()  # a tensor saved by several ops counts once
            live["seen"].add(key)
            live["now"] += size
            live["peak"] = max(live["peak"], live["now"])
            weakref.finalize(t, release, key, size)  # freed with its graph, after the backward
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(micro)
    return live["peak"]


if __name__ == "__main__":
    main()
