"""Validate the composed config once, before any process group or model exists.

Every problem found is reported together; each names the keys involved and how to fix them.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from pretrain.errors import UserError
from pretrain.evaluate.taskdata import check_config as eval_task_rules


class ConfigError(UserError):
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
    "parallel.activation_checkpointing": ("none", "full", "every", "selective"),
    "planner.check": ("refuse", "warn", "off"),
}


def _get(cfg: DictConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _at_least(problems: list[str], section: DictConfig, prefix: str, keys: tuple[str, ...], low: float) -> None:
    for key in keys:
        value = section[key]
        if value is not None and value < low:
            problems.append(f"{prefix}.{key}={value} must be >= {low:g}")


def validate(cfg: DictConfig, world_size: int) -> None:
    """Raise ConfigError listing every problem. ``world_size`` is the number of launched processes.

    Cheap and import-light: the entry points call it before process groups, data or models exist.
    """
    problems = _sizes(cfg)
    if problems:  # the rules below divide by these sizes
        raise ConfigError(problems)
    problems += _rules(cfg, world_size)
    if problems:
        raise ConfigError(problems)


def _sizes(cfg: DictConfig) -> list[str]:
    """Sizes that must be positive before any other rule can use them."""
    problems: list[str] = []
    m, par, tr = cfg.model, cfg.parallel, cfg.trainer
    _at_least(problems, m, "model", ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
                                      "vocab_multiple", "ffn_multiple_of", "num_kv_heads", "head_dim",
                                      "ffn_hidden_size", "vocab_size"), 1)
    _at_least(problems, par, "parallel", ("tensor", "pipeline", "data", "context", "reduce_bucket_size", "allgather_bucket_size"), 1)
    _at_least(problems, tr, "trainer", ("seq_length", "micro_batch_size", "global_batch_size", "grad_accum_steps",
                                         "max_steps"), 1)
    return problems


def _rules(cfg: DictConfig, world_size: int) -> list[str]:
    from pretrain.config import ffn_hidden_size, head_dim

    problems: list[str] = []
    m, par, tr, opt = cfg.model, cfg.parallel, cfg.trainer, cfg.optim
    tp, pp, dp, cp = par.tensor, par.pipeline, par.data, par.context

    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            problems.append(f"{key}={value!r} is not one of {', '.join(choices)}")

    if tp * pp * dp * cp != world_size:
        keys, sizes = "parallel.tensor * parallel.pipeline * parallel.data", f"{tp}*{pp}*{dp}"
        if cp > 1:
            keys, sizes = f"{keys} * parallel.context", f"{sizes}*{cp}"
        problems.append(
            f"{keys} = {sizes} = {tp * pp * dp * cp}, but {world_size} process(es) were launched: launch "
            f"{tp * pp * dp * cp} (torchrun --nproc_per_node) or pick a parallel plan whose sizes multiply to {world_size}"
        )
    problems += _context_rules(cfg)
    if par.timeout_minutes <= 0:
        problems.append(f"parallel.timeout_minutes={par.timeout_minutes} must be positive")
    if par.zero_stage not in (0, 1, 2, 3):
        problems.append(f"parallel.zero_stage={par.zero_stage} must be 0, 1, 2 or 3")
    if par.zero_stage >= 2 and pp > 1:
        problems.append(
            f"parallel.zero_stage={par.zero_stage} with parallel.pipeline={pp}: DeepSpeed's pipeline engine "
            "supports ZeRO stage 0 or 1 only; use zero_stage=1 or pipeline=1"
        )
    if par.virtual_stages != 1:
        problems.append(
            f"parallel.virtual_stages={par.virtual_stages}: training runs the plain 1F1B schedule (1); interleaved "
            "schedules are modelled by `python -m pretrain.plan` only, for now"
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
    if m.num_layers < pp:
        problems.append(
            f"model.num_layers={m.num_layers} is smaller than parallel.pipeline={pp}: every stage needs a block"
        )
    elif m.num_layers % pp:
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
    problems += _throughput_rules(m, synthetic=cfg.data.name == "synthetic")
    if m.document_mask and pp > 1:
        problems.append(f"model.document_mask=true with parallel.pipeline={pp}: the pipeline's stages pass only the "
                        "hidden states on, not the documents' boundaries; use pipeline=1 or document_mask=false")

    for key in ("hidden_dropout", "attention_dropout"):
        if not 0 <= m[key] < 1:
            problems.append(f"model.{key}={m[key]} must be in [0, 1): it is the probability of zeroing an activation")
    for key in ("init_std", "norm_eps", "rope_theta"):
        if not m[key] > 0:
            problems.append(f"model.{key}={m[key]} must be > 0")
    vocab = cfg.data.get("tokenizer", {}).get("vocab_size") if "data" in cfg else None
    if m.vocab_size is not None and vocab is not None and m.vocab_size < vocab:
        problems.append(
            f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's data.tokenizer.vocab_size={vocab}: "
            "leave model.vocab_size null to take the tokenizer's size"
        )
    if m.init_from is not None and not (Path(m.init_from) / "config.json").is_file():
        problems.append(f"model.init_from={m.init_from}: no transformers config.json there; point it at a "
                        "transformers model folder (GPT2LMHeadModel or LlamaForCausalLM)")

    mb, gb = tr.micro_batch_size, tr.global_batch_size
    if tr.grad_accum_steps is not None:
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
    if opt.lr <= 0:
        problems.append(f"optim.lr={opt.lr} must be > 0")
    problems += _optim_rules(cfg)
    problems += _run_rules(cfg)
    problems += eval_task_rules(cfg)  # trainer.eval_tasks* (pretrain/evaluate/taskdata.py)
    return problems


def _context_rules(cfg: DictConfig) -> list[str]:
    """Context parallelism: the sequence splits into 2 x context equal chunks (each rank holds two), and
    each rank's share splits again over TP under sequence parallelism."""
    m, par, seq = cfg.model, cfg.parallel, cfg.trainer.seq_length
    cp = par.context
    if cp <= 1:
        return []
    problems: list[str] = []
    if seq % (2 * cp):
        problems.append(
            f"trainer.seq_length={seq} is not divisible by 2 x parallel.context = {2 * cp}: context parallelism cuts "
            f"the sequence into {2 * cp} equal chunks (two per rank, for causal load balance); use a multiple of {2 * cp}"
        )
    elif par.sequence_parallel and (seq // cp) % par.tensor:
        problems.append(
            f"trainer.seq_length={seq} / parallel.context={cp} = {seq // cp} tokens per context rank is not divisible by "
            f"parallel.tensor={par.tensor}, which sequence parallelism splits them over; use a multiple of "
            f"{2 * cp * par.tensor}"
        )
    if m.attention_dropout > 0:
        problems.append(f"model.attention_dropout={m.attention_dropout} with parallel.context={cp}: ring attention has "
                        "no attention dropout; set model.attention_dropout=0 or parallel.context=1")
    from pretrain.config import head_dim
    from pretrain_kernels import HEAD_DIMS

    if head_dim(m) not in HEAD_DIMS:
        problems.append(f"head dim {head_dim(m)} with parallel.context={cp}: ring attention's block kernels take head "
                        f"dims {', '.join(map(str, HEAD_DIMS))}; set model.head_dim (or hidden_size / heads) to one")
    return problems


def _throughput_rules(m: DictConfig, synthetic: bool) -> list[str]:
    problems: list[str] = []
    if m.fused_loss_chunk < 1:
        problems.append(f"model.fused_loss_chunk={m.fused_loss_chunk} must be >= 1 (tokens per chunk of the fused loss)")
    if m.document_mask and m.eod_token_id is None and synthetic:  # prepared data brings its tokenizer's
        problems.append("model.document_mask=true with data=synthetic needs model.eod_token_id, the token id that "
                        "separates packed documents (prepared data sets it from its tokenizer's end-of-text token)")
    if m.eod_token_id is not None and m.eod_token_id < 0:
        problems.append(f"model.eod_token_id={m.eod_token_id} must be a token id (>= 0)")
    return problems


def _optim_rules(cfg: DictConfig) -> list[str]:
    opt, tr = cfg.optim, cfg.trainer
    problems: list[str] = []
    if not 0 <= opt.min_lr_ratio <= 1:
        problems.append(f"optim.min_lr_ratio={opt.min_lr_ratio} must be in [0, 1] (the final LR over the peak LR)")
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        problems.append(f"optim.betas={list(opt.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if not opt.eps > 0:
        problems.append(f"optim.eps={opt.eps} must be > 0")
    _at_least(problems, opt, "optim", ("weight_decay", "grad_clip", "warmup_tokens", "ramp_tokens", "gns_ramp_warmup"), 0)
    if opt.gns_batch_ramp and not cfg.logging.gns:
        problems.append("optim.gns_batch_ramp=true needs the noise scale it follows: set logging.gns=true")
    if opt.decay_tokens is not None and opt.decay_tokens < 1:
        problems.append(f"optim.decay_tokens={opt.decay_tokens} must be >= 1 (or null: the whole run)")
    if opt.decay_tokens is not None and 0 < opt.decay_tokens <= opt.warmup_tokens:
        problems.append(
            f"optim.decay_tokens={opt.decay_tokens} is not beyond optim.warmup_tokens={opt.warmup_tokens}: the cosine "
            "decay would be skipped; make decay_tokens larger than the warmup, or null for the whole run"
        )
    _at_least(problems, tr, "trainer", ("loss_spike_factor", "max_consecutive_skips", "eval_interval"), 0)
    if tr.eval_interval and tr.eval_iters < 1:
        problems.append(f"trainer.eval_iters={tr.eval_iters} must be >= 1 when trainer.eval_interval > 0")
    return problems


def _run_rules(cfg: DictConfig) -> list[str]:
    ck, lg = cfg.checkpoint, cfg.logging
    problems: list[str] = []
    _at_least(problems, ck, "checkpoint", ("interval", "keep_last"), 0)
    _at_least(problems, ck, "checkpoint", ("stop_after",), 1)
    _at_least(problems, lg, "logging", ("interval",), 1)
    _at_least(problems, cfg.planner, "planner", ("margin",), 0)
    if ck.resume not in ("auto", "never") and not Path(ck.resume).is_dir():
        problems.append(
            f"checkpoint.resume={ck.resume!r} is neither auto, never nor an existing directory: use auto (the newest "
            "checkpoint in checkpoint.dir), never, or the path of a run, checkpoints or step folder"
        )
    return problems
