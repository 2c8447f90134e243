"""Typed configuration: one dataclass per component, registered in Hydra's ConfigStore.

YAML groups under ``conf/`` fill these schemas; each component's ``build_*`` receives only its
own section. Runtime counters (step, tokens seen) live in ``TrainState``, never here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pretrain.data.config import DataConfig

# The YAML groups ship inside the package (pretrain/conf/), so an installed wheel finds them as an
# editable install does. Absolute, so `python -m ...` and the console scripts (for which Hydra would
# resolve a relative config_path as a Python module) find the same folder.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


class ReadOnlyError(AttributeError):
    """A write to the run config: derive a new value instead (``dataclasses.replace``)."""


class Sealable:
    """A schema section that ``seal`` makes read-only. Hydra composes and overrides it before then."""

    def __setattr__(self, name, value):
        if self.__dict__.get("_sealed"):
            raise ReadOnlyError(f"{type(self).__name__}.{name}: the run config is read-only; "
                                "derive a new value (dataclasses.replace) instead of writing to it")
        object.__setattr__(self, name, value)


def seal(section: Sealable) -> Sealable:
    """Make a section read-only (``dataclasses.replace`` still makes modified copies)."""
    object.__setattr__(section, "_sealed", True)
    return section


@dataclass
class ModelConfig(Sealable):
    name: str = MISSING
    num_layers: int = MISSING
    hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    # None means one KV head per query head (MHA); 1 is MQA; anything between is GQA.
    num_kv_heads: Optional[int] = None
    # None: hidden_size / num_attention_heads. GPT-3 XL uses 24 heads of 128 with d_model 2048.
    head_dim: Optional[int] = None
    # None: 4 * hidden for GELU; LLaMA's 2/3 * 4h rounded up to ffn_multiple_of for SwiGLU.
    ffn_hidden_size: Optional[int] = None
    ffn_multiple_of: int = 256
    max_position_embeddings: int = 1024
    # None: taken from the tokenizer the data pipeline produced.
    vocab_size: Optional[int] = None
    # The embedding is padded to a multiple of this, independent of the TP size, so
    # every layout builds the same shapes.
    vocab_multiple: int = 128
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    position_embedding: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    activation: str = "gelu"  # gelu | swiglu
    bias: bool = True
    tie_embeddings: bool = True
    parallel_block: bool = False  # PaLM: x + attn(ln(x)) + mlp(ln(x))
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    # GPT-2: residual-branch output projections scaled by 1/sqrt(2 * num_layers).
    scale_residual_init: bool = True
    attention_backend: str = "sdpa"  # sdpa | eager | triton
    compile: Optional[bool] = None  # torch.compile each block; null: on with CUDA (pretrain/model/compile.py)
    # The LM head and cross-entropy fused, token chunk by token chunk, so the [tokens, vocab] fp32
    # logits never exist at once (pretrain/model/fused_loss.py); false: logits, then megatron-core's loss.
    fused_loss: bool = True
    fused_loss_chunk: int = 512  # tokens per chunk: one chunk's fp32 logits are chunk x vocab / tp x 4 bytes
    # Packed sequences: attention stays within a document, each ended by the token eod_token_id (the
    # tokenizer's end-of-text id; GPT-2's is 50256). Positions stay global across documents, as Llama 3 trains.
    document_mask: bool = False
    eod_token_id: Optional[int] = None
    # Locally banded attention (GPT-3 sparse layers): window in tokens, applied to the layers
    # whose index is in local_attention_layers ("odd", "even", "all" or "none").
    local_window: Optional[int] = None
    local_attention_layers: str = "none"
    # A transformers folder (GPT2LMHeadModel / LlamaForCausalLM) whose weights replace the random
    # init; the settings above must describe the same architecture (pretrain.interop.import_hf).
    init_from: Optional[str] = None
    # Reference numbers from the papers, shown in summaries; never used for computation.
    reference_params: Optional[str] = None
    reference_batch_tokens: Optional[int] = None
    reference_lr: Optional[float] = None


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads


def ffn_hidden_size(cfg: ModelConfig) -> int:
    if cfg.ffn_hidden_size:
        return cfg.ffn_hidden_size
    if cfg.activation == "swiglu":
        hidden = int(2 * 4 * cfg.hidden_size / 3)
        return cfg.ffn_multiple_of * math.ceil(hidden / cfg.ffn_multiple_of)
    return 4 * cfg.hidden_size


@dataclass
class ParallelConfig(Sealable):
    name: str = "single"
    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    # Context parallelism: each micro-batch's sequence split over this many ranks (load-balanced causal
    # chunks, ring attention; pretrain/model/context.py). Weights are replicated over it like over data.
    context: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False
    # Gradient checkpointing: none | full (every block) | every (every k-th block) | selective (the
    # attention core of every block: softmax, dropout, attention over V; Korthikanti et al. 2022).
    activation_checkpointing: str = "none"
    checkpoint_every: int = 1
    # Interleaved 1F1B (model chunks per pipeline rank). The planner models it (python -m pretrain.plan);
    # the trainer runs DeepSpeed's plain 1F1B and refuses anything but 1 until it runs interleaved schedules.
    virtual_stages: int = 1
    # Communication overlap (DeepSpeed ZeRO >= 1): reduce gradients in buckets while the backward still
    # runs (overlap_comm), into one contiguous buffer (contiguous_gradients); bucket sizes in elements.
    # megatron-core's column-parallel linears always overlap their input-gradient all-reduce with the
    # weight-gradient matmul; `pretrain.train` sets CUDA_DEVICE_MAX_CONNECTIONS=1 for TP > 1 so on GPUs
    # the overlap holds. The GPU example plans turn these on.
    overlap_comm: bool = False
    contiguous_gradients: bool = False
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    # A collective that waits longer than this fails the job (a hung or dead rank) instead of
    # holding the allocation; raise it when a first step or a checkpoint save is slower.
    timeout_minutes: float = 30.0


def world_size(parallel) -> int:
    """Processes a plan needs: tensor x pipeline x data x context (a ParallelConfig or its DictConfig)."""
    return parallel.tensor * parallel.pipeline * parallel.data * parallel.context


@dataclass
class OptimConfig(Sealable):
    name: str = "adamw"
    lr: float = 6.0e-4
    min_lr_ratio: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1.0e-8
    weight_decay: float = 0.1
    # Embeddings decay unless this is False (GPT-3 decays them; many LLaMA recipes do not).
    decay_embeddings: bool = True
    grad_clip: float = 1.0
    # Schedule counted in tokens: linear warmup, cosine to min_lr_ratio over decay_tokens, then flat.
    warmup_tokens: int = 0
    decay_tokens: Optional[int] = None  # None: the whole run
    # Batch-size ramp (GPT-3): start at ramp_start_batch sequences, grow linearly to the
    # global batch over ramp_tokens, in steps of micro_batch * dp.
    ramp_start_batch: Optional[int] = None
    ramp_tokens: int = 0
    # Or drive the batch size by the measured critical batch (GPT-3 chose its ramp this way), between
    # ramp_start_batch (or micro x dp) and trainer.global_batch_size, after gns_ramp_warmup estimates
    # of the noise scale (logging.gns must be on).
    gns_batch_ramp: bool = False
    gns_ramp_warmup: int = 10


@dataclass
class TrainerConfig(Sealable):
    max_steps: int = 200
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16
    seq_length: int = 128
    micro_batch_size: int = 8
    global_batch_size: int = 8
    # None: derived as global / (micro * dp); if given it must agree.
    grad_accum_steps: Optional[int] = None
    eval_interval: int = 0  # steps; 0 disables
    eval_iters: int = 2
    # Downstream tasks scored on rank 0 from a gathered copy of the weights (pretrain/evaluate/inloop.py),
    # every eval_tasks_interval steps (0: every eval_interval steps); their first eval_tasks_limit
    # examples (None: all), with eval_tasks_fewshot few-shot examples.
    eval_tasks: List[str] = field(default_factory=list)
    eval_tasks_interval: int = 0
    eval_tasks_limit: Optional[int] = None
    eval_tasks_fewshot: int = 0
    progress_bar: bool = True
    # Deterministic algorithms where torch offers them (parity tests).
    deterministic: bool = False
    # An update whose loss is NaN/Inf is skipped (and counted); so is one whose loss exceeds this
    # factor x the running mean of accepted losses (0: no spike check). See pretrain/train/faults.py.
    loss_spike_factor: float = 0.0
    # Stop, with a checkpoint, after this many skipped updates in a row (0: never).
    max_consecutive_skips: int = 5


@dataclass
class CheckpointConfig(Sealable):
    # None: <run dir>/checkpoints
    dir: Optional[str] = None
    interval: int = 0  # steps; 0 saves only at the end
    save_final: bool = True
    keep_last: int = 2
    # auto: resume from the newest checkpoint in dir if there is one.
    resume: str = "auto"  # auto | never | PATH
    # Stop after this many steps although max_steps is larger (resume tests, time-boxed jobs).
    stop_after: Optional[int] = None


@dataclass
class LoggingConfig(Sealable):
    interval: int = 1
    plot: bool = True
    # Gradient noise scale from each DP rank's own gradient vs the all-reduced one (pretrain/train/gns.py).
    # Costs one fp32 copy of each rank's gradients at pp == 1; also logs DP rank 0's grad_norm_local.
    gns: bool = True
    # Weights & Biases: online when logged in (WANDB_API_KEY / `wandb login`), else offline in the run dir.
    wandb: bool = True
    wandb_project: str = "pretrain"
    # Third-party warnings and INFO records (megatron-core, DeepSpeed) on the terminal too; by
    # default they go to the run's train.log only (pretrain/console.py).
    verbose: bool = False


@dataclass
class PlannerConfig(Sealable):
    """The pre-launch memory check (pretrain/plan/check.py), run before any process group starts."""

    check: str = "refuse"  # refuse (exit 2) | warn | off
    # How far the predicted per-GPU memory may exceed the device's before the check acts (a fraction).
    margin: float = 0.05
    # A catalogue name (python -m pretrain.plan --help); None: the CUDA device this process sees (a CPU
    # run has none and is not checked).
    gpu: Optional[str] = None


# Keys that moved; the old name is refused with the new one (pretrain.train.cli).
RENAMED = {
    "logging.gns_batch_ramp": "optim.gns_batch_ramp",  # it changes training, not what is logged
    "logging.gns_ramp_warmup": "optim.gns_ramp_warmup",
}


def check_renamed(overrides: list[str]) -> None:
    """Refuse, naming the new key, each command-line override of a key that has moved."""
    from pretrain.errors import UserError

    problems = []
    for arg in overrides:
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key in RENAMED:
            problems.append(f"{key} was renamed {RENAMED[key]}: use {RENAMED[key]}={value}")
    if problems:
        raise UserError("; ".join(problems))


@dataclass
class Config:
    model: ModelConfig = MISSING
    parallel: ParallelConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    data: DataConfig = MISSING
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)


def compose_training(overrides: list[str], what: str = "training config"):
    """The training config exactly as ``pretrain.train`` composes it from ``overrides``, for the entry
    points that compose without ``@hydra.main`` (launch, plan, bench). Bad overrides: a UserError."""
    from hydra import compose, initialize_config_dir

    from pretrain.errors import composing

    check_renamed(overrides)
    register_configs()
    with composing(what), initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)  # Hydra's message names the override


@dataclass(frozen=True)
class RunConfig:
    """The composed config, typed and immutable: what every builder reads at run time.

    ``typed`` converts each section once into its schema's dataclass (so the hints are true) and
    seals it; an attempt to write to it raises. ``data`` stays a read-only OmegaConf node (the data
    pipeline hashes it into its cache keys) and ``composed`` is the read-only original, for the run's
    ``config.yaml`` and W&B (interpolations kept, secrets redacted). Values derived from the config and
    the data (the vocabulary, the batch schedule) are computed objects beside it, never written here.
    """

    model: ModelConfig
    parallel: ParallelConfig
    optim: OptimConfig
    trainer: TrainerConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    planner: PlannerConfig
    data: Any
    composed: Any


def typed(cfg) -> RunConfig:
    """The composed DictConfig as a ``RunConfig``. Call once, after validation."""
    from omegaconf import OmegaConf

    cfg = cfg.copy()
    OmegaConf.set_readonly(cfg, True)
    sections = {name: seal(OmegaConf.to_object(cfg[name]))  # resolves interpolations
                for name in ("model", "parallel", "optim", "trainer", "checkpoint", "logging", "planner")}
    return RunConfig(**sections, data=cfg.data, composed=cfg)


def register_configs() -> None:
    """Register the schemas; YAML files in conf/<group>/ name them with ``_self_`` defaults."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
