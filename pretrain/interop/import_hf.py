"""Start from a Hugging Face transformers checkpoint (GPT2LMHeadModel or LlamaForCausalLM).

    python -m pretrain.interop.import_hf HF_DIR [--name NAME] > pretrain/conf/model/NAME.yaml
    python -m pretrain.train model=NAME model.init_from=HF_DIR ...

``from_hf`` turns a transformers folder into a model config and canonical full tensors (the
inverse of ``export.to_hf``); ``apply_init_from`` loads them into a model of any layout, each rank
keeping its TP slice of the parameters it holds. Only safetensors weights are read; nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config import ModelConfig
from pretrain.errors import UserError, user_errors

# The settings that decide parameter shapes and the forward math; init_from checks them.
ARCHITECTURE = (
    "num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
    "norm", "position_embedding", "activation", "bias", "tie_embeddings", "parallel_block",
)


class HFImportError(UserError):
    """A transformers model this framework cannot represent; the message names the setting."""


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise HFImportError(f"{path}: no model.safetensors (only safetensors checkpoints are read)")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(str(path / f)))
        except (OSError, RuntimeError, ValueError) as err:  # safetensors' SafetensorError is a RuntimeError
            raise HFImportError(f"{path / f}: cannot be read as safetensors ({err}); the file is damaged or truncated") from None
    return {k: v.float() for k, v in sd.items()}


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise HFImportError(f"{path}: missing; pass a transformers model folder (config.json + model.safetensors)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise HFImportError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise HFImportError(f"{path}: expected a JSON object")
    return value


def _model_config(hf: dict) -> ModelConfig:
    if hf.get("model_type") not in ("gpt2", "llama"):
        raise HFImportError(f"model_type={hf.get('model_type')}: only gpt2 and llama checkpoints can be imported")
    try:
        return _known_model_config(hf)
    except KeyError as err:
        raise HFImportError(f"config.json has no {err} (model_type={hf['model_type']}); is it a transformers config?") from None


def _known_model_config(hf: dict) -> ModelConfig:
    kind = hf["model_type"]
    vocab = hf["vocab_size"]
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise HFImportError(f"GPT-2 activation_function={act}: only the tanh GELU (gelu_new) is supported")
        for knob in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(knob):
                raise HFImportError(f"GPT-2 {knob}=true is not supported")
        if hf.get("scale_attn_weights", True) is False:
            raise HFImportError("GPT-2 scale_attn_weights=false is not supported")
        h = hf["n_embd"]
        return ModelConfig(
            name="hf-gpt2", num_layers=hf["n_layer"], hidden_size=h, num_attention_heads=hf["n_head"],
            ffn_hidden_size=hf.get("n_inner") or 4 * h, max_position_embeddings=hf["n_positions"], vocab_size=vocab,
            norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), position_embedding="learned",
            activation="gelu", bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        )
    if kind == "llama":  # the only other kind _model_config lets through
        if hf.get("hidden_act", "silu") != "silu":
            raise HFImportError(f"Llama hidden_act={hf['hidden_act']}: only silu (SwiGLU) is supported")
        rope = hf.get("rope_parameters") or {}
        if (rope.get("rope_type") or "default") != "default" or hf.get("rope_scaling"):
            raise HFImportError(f"Llama rope scaling {rope or hf.get('rope_scaling')} is not supported")
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
            raise HFImportError("Llama attention_bias != mlp_bias: this framework has one model.bias switch")
        heads = hf["num_attention_heads"]
        return ModelConfig(
            name="hf-llama", num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            num_attention_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, ffn_hidden_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"], vocab_size=vocab, norm="rmsnorm",
            norm_eps=hf["rms_norm_eps"], position_embedding="rope",
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), activation="swiglu",
            bias=bool(hf.get("attention_bias", False)), tie_embeddings=hf.get("tie_word_embeddings", False),
        )


def _fuse_qkv(q, k, v, kv: int, d: int) -> torch.Tensor:
    """q [kv * g * d, ...], k, v [kv * d, ...] -> our fused rows [kv, g + 2, d, ...]."""
    rest = q.shape[1:]
    q = q.reshape(kv, -1, d, *rest)
    return torch.cat([q, k.reshape(kv, 1, d, *rest), v.reshape(kv, 1, d, *rest)], dim=1).reshape(-1, *rest)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad the vocabulary dim with zero rows up to the padded vocabulary (never sampled: generate masks them)."""
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def from_hf(path) -> tuple:
    """(model config as a DictConfig, {canonical name: full fp32 tensor}) from a transformers folder."""
    from pretrain.model.gpt import padded_vocab_size
    from pretrain.model.layers import head_dim

    path = Path(path)
    hf = _read_json(path / "config.json")
    ours = path / "pretrain_model.json"  # written by export: the exact original settings
    try:
        m = OmegaConf.merge(OmegaConf.structured(ModelConfig), _read_json(ours) if ours.is_file() else _model_config(hf))
    except OmegaConfBaseException as err:
        raise HFImportError(f"{ours if ours.is_file() else path / 'config.json'}: not a model config this framework "
                            f"knows ({err})") from None
    sd = _read_weights(path)
    vocab, d = padded_vocab_size(m), head_dim(m)
    kv = m.num_kv_heads or m.num_attention_heads
    out = {}
    if hf["model_type"] == "gpt2":
        p = "transformer."
        if not any(k.startswith(p) for k in sd):
            sd, p = {"transformer." + k: v for k, v in sd.items()}, "transformer."  # GPT2Model without head
        out["embed.word.weight"] = _pad_rows(sd[p + "wte.weight"], vocab)
        out["embed_out.pos.weight"] = sd[p + "wpe.weight"]
        for i in range(m.num_layers):
            b, h = f"blocks.{i}.", f"{p}h.{i}."
            for ours_, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
                out[b + ours_ + ".weight"] = sd[h + theirs + ".weight"]
                out[b + ours_ + ".bias"] = sd[h + theirs + ".bias"]
            q, k, v = sd[h + "attn.c_attn.weight"].t().chunk(3, dim=0)
            out[b + "attn.qkv.weight"] = _fuse_qkv(q, k, v, kv, d)
            q, k, v = sd[h + "attn.c_attn.bias"].chunk(3, dim=0)
            out[b + "attn.qkv.bias"] = _fuse_qkv(q, k, v, kv, d)
            for ours_, theirs in (("attn.proj", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[b + ours_ + ".weight"] = sd[h + theirs + ".weight"].t()
                out[b + ours_ + ".bias"] = sd[h + theirs + ".bias"]
        out["final_norm.norm.weight"] = sd[p + "ln_f.weight"]
        out["final_norm.norm.bias"] = sd[p + "ln_f.bias"]
    else:
        out["embed.word.weight"] = _pad_rows(sd["model.embed_tokens.weight"], vocab)
        for i in range(m.num_layers):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            out[b + "ln1.weight"] = sd[h + "input_layernorm.weight"]
            out[b + "ln2.weight"] = sd[h + "post_attention_layernorm.weight"]
            for n in ["weight"] + (["bias"] if m.bias else []):
                a = h + "self_attn."
                out[b + "attn.qkv." + n] = _fuse_qkv(sd[a + "q_proj." + n], sd[a + "k_proj." + n], sd[a + "v_proj." + n], kv, d)
                out[b + "attn.proj." + n] = sd[a + "o_proj." + n]
                out[b + "mlp.fc1." + n] = torch.cat([sd[h + "mlp.gate_proj." + n], sd[h + "mlp.up_proj." + n]])
                out[b + "mlp.fc2." + n] = sd[h + "mlp.down_proj." + n]
        out["final_norm.norm.weight"] = sd["model.norm.weight"]
    if not m.tie_embeddings:
        out["output.linear.weight"] = _pad_rows(sd["lm_head.weight"], vocab)
    return m, {k: v.contiguous() for k, v in out.items()}


def check_compatible(configured, imported) -> None:
    """Raise naming every architecture setting where the configured model differs from the checkpoint."""
    from pretrain.model.gpt import padded_vocab_size
    from pretrain.model.layers import ffn_hidden_size, head_dim

    resolved = {"head_dim": head_dim, "ffn_hidden_size": ffn_hidden_size, "num_kv_heads": lambda c: c.num_kv_heads or c.num_attention_heads}
    diffs = []
    for key in ARCHITECTURE:
        get = resolved.get(key, lambda c, k=key: getattr(c, k))  # a DictConfig or a typed ModelConfig
        if get(configured) != get(imported):
            diffs.append(f"model.{key}={get(configured)} (checkpoint: {get(imported)})")
    if configured.vocab_size is not None and padded_vocab_size(configured) != padded_vocab_size(imported):
        diffs.append(f"padded vocabulary {padded_vocab_size(configured)} (checkpoint: {padded_vocab_size(imported)})")
    if diffs:
        raise HFImportError("model.init_from: the configured model does not fit the checkpoint: " + "; ".join(diffs))


@torch.no_grad()
def apply_init_from(model, model_cfg, path: str) -> None:
    """Overwrite this rank's parameters with the transformers checkpoint's. Every rank calls it (collective)."""
    from pretrain.model.gpt import canonical_parameters
    from pretrain.model.weights import check_fits, gathered_full_shapes, shard

    imported_cfg, full = from_hf(path)
    check_compatible(model_cfg, imported_cfg)
    params = list(canonical_parameters(model))
    # Shapes of the whole model, not this stage's: then every rank sees the same misfits and raises alike.
    check_fits({name: t.shape for name, t in full.items()}, gathered_full_shapes(params), f"model.init_from={path}",
               HFImportError, f"Configure the model as `python -m pretrain.interop.import_hf {path}` prints it")
    for name, p in params:
        p.copy_(shard(full[name], p).to(p.dtype))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.interop.import_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir")
    parser.add_argument("--name", default=None, help="model name in the printed config")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    with user_errors("import_hf", debug=args.debug):
        m, _ = from_hf(args.hf_dir)
    m.name = args.name or m.name
    m.init_from = str(Path(args.hf_dir).resolve()) if "init_from" in m else None
    body = {k: v for k, v in OmegaConf.to_container(m).items() if v is not None and not k.startswith("reference_")}
    print("defaults:\n  - model_schema\n  - _self_\n" + OmegaConf.to_yaml(OmegaConf.create(body)), end="")


if __name__ == "__main__":
    main()
