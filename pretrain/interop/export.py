"""Export a pretrain checkpoint to a Hugging Face transformers model folder.

    python -m pretrain.interop.export CKPT_DIR OUT_DIR [--tag stepXXXXXXXX] [--config RUN/config.yaml]

CKPT_DIR is a run directory, its ``checkpoints`` folder, or one tag folder inside it. The
checkpoint may come from any layout (tp, pp, dp, ZeRO 0-3, fp32 or bf16): ``consolidate`` reads
the fp32 master weights with ``checkpoint.saved.SavedCheckpoint`` as full tensors under canonical names
(``blocks.3.attn.qkv.weight``). ``to_hf`` maps those to ``GPT2LMHeadModel`` or
``LlamaForCausalLM``; settings transformers cannot represent are refused by name.

Runs in one process without process groups; no GPU needed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from pretrain.checkpoint import manifest
from pretrain.errors import UserError, user_errors
from pretrain.checkpoint.reshard import malformed
from pretrain.checkpoint.saved import SavedCheckpoint


class ExportError(UserError):
    """The checkpoint or its settings cannot be exported; the message names the cause."""


# ---------------------------------------------------------------------------------------------
# Finding the checkpoint and its config


def locate(path: str, tag: Optional[str] = None, config: Optional[str] = None) -> tuple[DictConfig, Path, str]:
    """(resolved run config, checkpoint dir, tag) for a run dir, checkpoints dir or tag dir."""
    path, tag = manifest.find(path, tag)
    config_path = Path(config) if config else path.parent / "config.yaml"
    if not config_path.is_file():
        raise ExportError(f"{config_path}: resolved run config not found; pass --config RUN_DIR/config.yaml")
    try:
        cfg = OmegaConf.load(config_path)
    except Exception as err:  # YAML syntax or encoding: the file is damaged or not a run config
        raise ExportError(f"{config_path}: not a readable run config ({type(err).__name__}: {err})") from None
    if not isinstance(cfg, DictConfig) or not isinstance(cfg.get("model"), DictConfig) or "data" not in cfg:
        raise ExportError(f"{config_path}: not a pretrain run config (no model/data sections); pass --config RUN_DIR/config.yaml")
    return cfg, path, tag


def consolidate(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 master weights under canonical names from a checkpoint of any layout."""
    with malformed(Path(ckpt_dir) / tag):
        full, _ = SavedCheckpoint(Path(ckpt_dir) / tag).full_states(("fp32",))
    return {name: states["fp32"] for name, states in full.items()}


# ---------------------------------------------------------------------------------------------
# Canonical tensors -> transformers


def _family(m) -> str:
    """'gpt2' or 'llama'; raises naming every knob transformers cannot represent."""
    problems = []
    if m.parallel_block:
        problems.append("model.parallel_block=true (PaLM-style parallel attention/MLP)")
    if m.local_window is not None and m.local_attention_layers != "none":
        problems.append(f"model.local_window={m.local_window} with local_attention_layers={m.local_attention_layers}")
    gpt2 = (m.norm, m.position_embedding, m.activation) == ("layernorm", "learned", "gelu")
    llama = (m.norm, m.position_embedding, m.activation) == ("rmsnorm", "rope", "swiglu")
    if not (gpt2 or llama):
        problems.append(
            f"model.norm={m.norm}, model.position_embedding={m.position_embedding}, model.activation={m.activation} "
            "(GPT-2 needs layernorm+learned+gelu, LLaMA rmsnorm+rope+swiglu)"
        )
    if gpt2:
        if not m.bias:
            problems.append("model.bias=false (GPT-2 has biases everywhere)")
        if m.num_kv_heads not in (None, m.num_attention_heads):
            problems.append(f"model.num_kv_heads={m.num_kv_heads} (GPT-2 has no grouped-query attention)")
        if m.head_dim not in (None, m.hidden_size // m.num_attention_heads):
            problems.append(f"model.head_dim={m.head_dim} (GPT-2 needs hidden_size / num_attention_heads)")
    if problems:
        raise ExportError("transformers cannot represent this model: " + "; ".join(problems))
    return "gpt2" if gpt2 else "llama"


def _dims(m):
    from pretrain.model.gpt import padded_vocab_size
    from pretrain.model.layers import ffn_hidden_size, head_dim

    heads = m.num_attention_heads
    kv = m.num_kv_heads or heads
    return padded_vocab_size(m), head_dim(m), heads, kv, ffn_hidden_size(m)


def hf_config(m, eos_id: Optional[int] = None):
    """The transformers config for model config ``m`` (a ModelConfig / DictConfig)."""
    from transformers import GPT2Config, LlamaConfig

    vocab, d, heads, kv, ffn = _dims(m)
    common = dict(vocab_size=vocab, tie_word_embeddings=bool(m.tie_embeddings), bos_token_id=eos_id, eos_token_id=eos_id)
    if _family(m) == "gpt2":
        return GPT2Config(
            n_positions=m.max_position_embeddings, n_embd=m.hidden_size, n_layer=m.num_layers, n_head=heads,
            n_inner=ffn, activation_function="gelu_new", layer_norm_epsilon=m.norm_eps,
            resid_pdrop=m.hidden_dropout, embd_pdrop=m.hidden_dropout, attn_pdrop=m.attention_dropout, **common,
        )
    return LlamaConfig(
        hidden_size=m.hidden_size, intermediate_size=ffn, num_hidden_layers=m.num_layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=d, max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, attention_bias=bool(m.bias), mlp_bias=bool(m.bias),
        hidden_act="silu", attention_dropout=m.attention_dropout, **common,
    )


def _split_qkv(t: torch.Tensor, kv: int, group: int, d: int):
    """Our fused rows [kv, group + 2, d] -> q [kv * group * d], k [kv * d], v [kv * d] (+ trailing dims)."""
    t = t.reshape(kv, group + 2, d, *t.shape[1:])
    rest = t.shape[3:]
    return t[:, :group].reshape(-1, *rest), t[:, group].reshape(-1, *rest), t[:, group + 1].reshape(-1, *rest)


def to_hf(m, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical full tensors -> transformers state dict (GPT2LMHeadModel or LlamaForCausalLM)."""
    family = _family(m)
    vocab, d, heads, kv, ffn = _dims(m)
    group = heads // kv
    out = {}
    if family == "gpt2":
        out["transformer.wte.weight"] = sd["embed.word.weight"]
        out["transformer.wpe.weight"] = sd["embed_out.pos.weight"]
        for i in range(m.num_layers):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
                out[h + theirs + ".weight"] = sd[b + ours + ".weight"]
                out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
            # Conv1D stores weights transposed; c_attn's columns are [all q | all k | all v].
            out[h + "attn.c_attn.weight"] = torch.cat(_split_qkv(sd[b + "attn.qkv.weight"], kv, group, d)).t()
            out[h + "attn.c_attn.bias"] = torch.cat(_split_qkv(sd[b + "attn.qkv.bias"], kv, group, d))
            for ours, theirs in (("attn.proj", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[h + theirs + ".weight"] = sd[b + ours + ".weight"].t()
                out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
        out["transformer.ln_f.weight"] = sd["final_norm.norm.weight"]
        out["transformer.ln_f.bias"] = sd["final_norm.norm.bias"]
        if not m.tie_embeddings:
            out["lm_head.weight"] = sd["output.linear.weight"]
        return {k: v.contiguous() for k, v in out.items()}

    out["model.embed_tokens.weight"] = sd["embed.word.weight"]
    for i in range(m.num_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = sd[b + "ln1.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[b + "ln2.weight"]
        names = ["weight"] + (["bias"] if m.bias else [])
        for p in names:
            q, k, v = _split_qkv(sd[b + "attn.qkv." + p], kv, group, d)
            out[h + "self_attn.q_proj." + p], out[h + "self_attn.k_proj." + p], out[h + "self_attn.v_proj." + p] = q, k, v
            out[h + "self_attn.o_proj." + p] = sd[b + "attn.proj." + p]
            gate, up = sd[b + "mlp.fc1." + p].chunk(2, dim=0)
            out[h + "mlp.gate_proj." + p], out[h + "mlp.up_proj." + p] = gate, up
            out[h + "mlp.down_proj." + p] = sd[b + "mlp.fc2." + p]
    out["model.norm.weight"] = sd["final_norm.norm.weight"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd["output.linear.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def tokenizer_file(cfg: DictConfig) -> Optional[str]:
    """The run's HF tokenizers JSON (a cache hit of the data pipeline), or None for synthetic data."""
    if cfg.data.name == "synthetic":
        return None
    from pretrain.data import prepare_data

    return prepare_data(cfg.data).tokenizer_file


def save_tokenizer(path: str, out_dir: Path, eod_token: str, vocab_size: int) -> int:
    """Write tokenizer.json + tokenizer_config.json; returns the end-of-text id."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=path, bos_token=eod_token, eos_token=eod_token, unk_token=eod_token)
    if len(tok) > vocab_size:
        raise ExportError(f"the tokenizer has {len(tok)} tokens but the model only {vocab_size} (model.vocab_size)")
    tok.save_pretrained(out_dir)
    return tok.convert_tokens_to_ids(eod_token)


def save_hf(m, sd_canonical: dict, out_dir: Path, tokenizer: Optional[str] = None, eod_token: str = "<|endoftext|>") -> None:
    """Write config.json, model.safetensors and (if given) the tokenizer files to out_dir."""
    from safetensors.torch import save_file

    m = OmegaConf.create(OmegaConf.to_container(m, resolve=True)) if not isinstance(m, DictConfig) else m
    hf_sd = to_hf(m, sd_canonical)  # refuses unsupported models before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eos = save_tokenizer(tokenizer, out_dir, eod_token, m.vocab_size) if tokenizer else None
    config = hf_config(m, eos)
    config.torch_dtype = "float32"
    config.save_pretrained(out_dir)
    if m.tie_embeddings:  # transformers re-ties lm_head on load; safetensors refuses shared storage
        hf_sd = {k: v for k, v in hf_sd.items() if k != "lm_head.weight"}
    save_file(hf_sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "pretrain_model.json").write_text(json.dumps(OmegaConf.to_container(m, resolve=True), indent=1))


def export(ckpt: str, out_dir: str, tag: Optional[str] = None, config: Optional[str] = None) -> Path:
    cfg, ckpt_dir, tag = locate(ckpt, tag, config)
    _family(cfg.model)  # refuse before reading the weights
    sd = consolidate(ckpt_dir, tag)
    eod = cfg.data.tokenizer.get("eod_token", "<|endoftext|>") if "tokenizer" in cfg.data else "<|endoftext|>"
    save_hf(cfg.model, sd, Path(out_dir), tokenizer_file(cfg), eod)
    return Path(out_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.interop.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run dir, its checkpoints dir, or a tag dir")
    parser.add_argument("out_dir")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest intact one)")
    parser.add_argument("--config", default=None, help="the run's config.yaml if not beside the checkpoints dir")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with user_errors("export", debug=args.debug):
        out = export(args.checkpoint, args.out_dir, args.tag, args.config)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
