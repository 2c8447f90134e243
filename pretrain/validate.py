"""Validate the composed config once, before any process group or model exists.

Every problem found is reported together; each names the keys involved and how to fix them.
"""

from __future__ import annotations

from omegaconf import DictConfig


class ConfigError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


_CHOICES = {
    "model.norm": ("layernorm", "rmsnorm"),
    "model.position_embedding": ("learned", "rope"),
    "model.activation": ("gelu", "swiglu"),
    "model.attention_backend": ("sdpa", "eager", "triton"),
    "model.local_attention_layers": ("none", "all", "odd", "even"),
    "trainer.precision": ("fp32", "bf16"),
    "parallel.activation_checkpointing": ("none", "full", "every"),
}


def _get(cfg: DictConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(cfg: DictConfig, world_size: int) -> None:
    """Raise ConfigError listing every problem. ``world_size`` is the number of launched processes."""
    from pretrain.model.layers import ffn_hidden_size, head_dim

    problems: list[str] = []
    m, par, tr, opt = cfg.model, cfg.parallel, cfg.trainer, cfg.optim
    tp, pp, dp = par.tensor, par.pipeline, par.data

    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            problems.append(f"{key}={value!r} is not one of {', '.join(choices)}")

    for key in ("tensor", "pipeline", "data"):
        if par[key] < 1:
            problems.append(f"parallel.{key}={par[key]} must be >= 1")
    if tp * pp * dp != world_size:
        problems.append(
            f"parallel.tensor * parallel.pipeline * parallel.data = {tp}*{pp}*{dp} = {tp * pp * dp}, but "
            f"{world_size} process(es) were launched: launch {tp * pp * dp} (torchrun --nproc_per_node) "
            f"or pick a parallel plan whose sizes multiply to {world_size}"
        )
    if par.timeout_minutes <= 0:
        problems.append(f"parallel.timeout_minutes={par.timeout_minutes} must be positive")
    if par.zero_stage not in (0, 1, 2, 3):
        problems.append(f"parallel.zero_stage={par.zero_stage} must be 0, 1, 2 or 3")
    if par.zero_stage >= 2 and pp > 1:
        problems.append(
            f"parallel.zero_stage={par.zero_stage} with parallel.pipeline={pp}: DeepSpeed's pipeline engine "
            "supports ZeRO stage 0 or 1 only; use zero_stage=1 or pipeline=1"
        )
    if par.sequence_parallel and tp == 1:
        problems.append("parallel.sequence_parallel=true needs parallel.tensor > 1")
    if par.activation_checkpointing == "every" and par.checkpoint_every < 1:
        problems.append(f"parallel.checkpoint_every={par.checkpoint_every} must be >= 1")

    heads = m.num_attention_heads
    kv = m.num_kv_heads or heads
    if m.head_dim is None and m.hidden_size % heads:
        problems.append(f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={heads}: set model.head_dim")
    if kv < 1 or heads % kv:
        problems.append(f"model.num_kv_heads={kv} must divide model.num_attention_heads={heads} (MHA: equal, MQA: 1)")
    if heads % tp:
        problems.append(f"model.num_attention_heads={heads} is not divisible by parallel.tensor={tp}: pick tp dividing the heads")
    if kv % tp:
        problems.append(
            f"model.num_kv_heads={kv} is not divisible by parallel.tensor={tp}: each TP rank needs whole KV heads; "
            "use fewer TP ranks or more KV heads"
        )
    ffn = ffn_hidden_size(m)
    if ffn % tp:
        problems.append(f"FFN size {ffn} (model.ffn_hidden_size) is not divisible by parallel.tensor={tp}")
    if m.vocab_multiple % tp:
        problems.append(f"model.vocab_multiple={m.vocab_multiple} is not divisible by parallel.tensor={tp}")
    if m.num_layers % pp:
        problems.append(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline={pp}: stages need equal block counts"
        )
    if m.position_embedding == "rope" and head_dim(m) % 2:
        problems.append(f"rotary embeddings need an even head dim, got {head_dim(m)} (model.head_dim)")
    if tr.seq_length > m.max_position_embeddings:
        problems.append(
            f"trainer.seq_length={tr.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}: "
            "shorten the sequence or enlarge the position table"
        )
    if m.attention_backend == "triton" and m.attention_dropout > 0:
        problems.append("model.attention_backend=triton has no attention dropout: set model.attention_dropout=0 or use sdpa")
    if m.local_window is not None and m.local_window < 1:
        problems.append(f"model.local_window={m.local_window} must be >= 1")

    mb, gb = tr.micro_batch_size, tr.global_batch_size
    if mb < 1 or gb < 1:
        problems.append("trainer.micro_batch_size and trainer.global_batch_size must be >= 1")
    elif tr.grad_accum_steps is not None:
        if mb * tr.grad_accum_steps * dp != gb:
            problems.append(
                f"trainer.global_batch_size={gb} != trainer.micro_batch_size * trainer.grad_accum_steps * parallel.data "
                f"= {mb}*{tr.grad_accum_steps}*{dp} = {mb * tr.grad_accum_steps * dp}; "
                "set grad_accum_steps=null to derive it, or fix the sizes"
            )
    elif gb % (mb * dp):
        problems.append(
            f"trainer.global_batch_size={gb} is not a multiple of trainer.micro_batch_size * parallel.data = {mb}*{dp}"
        )
    if opt.ramp_start_batch is not None and mb >= 1:
        if opt.ramp_start_batch % (mb * dp) or not 0 < opt.ramp_start_batch <= gb:
            problems.append(
                f"optim.ramp_start_batch={opt.ramp_start_batch} must be a multiple of micro_batch_size * parallel.data "
                f"= {mb * dp} and at most trainer.global_batch_size={gb}"
            )
    if tr.max_steps < 1:
        problems.append(f"trainer.max_steps={tr.max_steps} must be >= 1")
    if opt.lr <= 0:
        problems.append(f"optim.lr={opt.lr} must be > 0")

    if problems:
        raise ConfigError(problems)


def grad_accum_steps(cfg: DictConfig) -> int:
    tr = cfg.trainer
    return tr.grad_accum_steps or tr.global_batch_size // (tr.micro_batch_size * cfg.parallel.data)
