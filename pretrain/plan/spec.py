"""What the planner models: one ``Spec`` (model shape x training sizes x parallel plan) and its FLOPs.

A ``Spec`` is built from a composed training config (``from_config``) or directly (tests, search).
Sizes: s tokens per sequence, b sequences per micro-batch, B sequences per global batch. With context
parallelism (cp ranks per sequence) each rank holds s/cp of every sequence's tokens (``local_seq``);
GPUs = tp x pp x dp x cp, and B = b x m x dp (context ranks add no sequences).

FLOP formulas (forward + backward, per iteration, as the sources count them; PLANNER_DATA.md):

- per token and layer, forward: 2 x (the layer's matmul weights) + 4 s a d (QK^T and AV over the full
  s x s score matrix); the LM head 2 V h. For GPT (12 h^2 weights, a d = h) this is Korthikanti's
  model FLOPs 72 B L s h^2 (1 + s/(6h) + V/(12 h L)) once multiplied by 3 (forward + 2x backward).
- model FLOPs (MFU) = 3 x forward. Hardware FLOPs (HFU) add what recomputation runs again: full
  recompute one more forward of every layer (Narayanan's 96 B s L h^2 (1 + s/(6h) + V/(16 L h)));
  selective the attention core only (Korthikanti's 72 B L s h^2 (1 + s/(3h) + V/(12 h L))).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from pretrain.errors import UserError

RECOMPUTE = ("none", "selective", "full")
ATTENTION = ("flash", "materialized")
PRECISION = ("bf16", "fp32")


class PlanError(UserError):
    """A plan the planner cannot model: sizes that do not divide, unknown options."""


@dataclass(frozen=True)
class Spec:
    # Model
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int  # padded
    swiglu: bool = False
    bias: bool = True
    tied: bool = True
    learned_positions: int = 0  # rows of a learned position table
    rope: bool = False
    dropout: bool = False  # dropout masks are stored (and their bytes moved)
    # Training sizes
    seq: int = 2048
    micro_batch: int = 1
    global_batch: int = 1
    # Parallel plan
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0
    cp: int = 1  # context parallelism: ranks sharing each sequence (ring attention)
    sp: bool = False
    recompute: str = "none"
    virtual_stages: int = 1
    # System choices the sources differ on
    attention: str = "flash"
    # The block kernel ring attention runs when cp > 1: "flash" (the fused Triton block kernels the ring
    # runs on GPUs, whatever the attention backend) or "materialized" (the PyTorch reference blocks).
    ring_attention: str = "flash"
    attention_dropout: bool = False  # model.attention_dropout > 0: ring attention (cp > 1) has none
    grad_bytes: int = 2  # 2: bf16 gradients (ZeRO paper, DeepSpeed); 4: fp32 main grads (Megatron-LM)
    overlap_dp: bool = True  # gradient reduction overlaps the last micro-batch's backward
    precision: str = "bf16"  # bf16: 2-byte weights and activations, fp32 master; fp32: 4 bytes throughout
    # RMSNorm from torch ops (CPU, or no apex): keeps its input, the normalised input and its output
    # (3 h per token) and an fp32 rstd; apex's fused norms (GPU) keep the input and the next matmul's.
    unfused_rmsnorm: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def local_seq(self) -> int:
        """Tokens of each sequence one context rank holds (two chunks of s/(2 cp))."""
        return self.seq // self.cp

    @property
    def kernel(self) -> str:
        """The attention kernel this plan runs: ``attention`` without CP, the ring's block kernel with it."""
        return self.attention if self.cp == 1 else self.ring_attention

    @property
    def replicas(self) -> int:
        """Ranks holding the same weights, over which ZeRO shards and gradients are reduced: dp x cp."""
        return self.dp * self.cp

    @property
    def micro_batches(self) -> int:
        """Micro-batches per pipeline per step (gradient accumulation steps)."""
        return self.global_batch // (self.micro_batch * self.dp)

    def with_(self, **changes) -> "Spec":
        return replace(self, **changes)

    def problems(self) -> list[str]:
        """Why this plan cannot run (empty when it can)."""
        out = []
        if self.recompute not in RECOMPUTE:
            out.append(f"recompute={self.recompute!r} is not one of {', '.join(RECOMPUTE)}")
        if self.attention not in ATTENTION:
            out.append(f"plan.attention={self.attention!r} is not one of {', '.join(ATTENTION)}")
        if self.ring_attention not in ATTENTION:
            out.append(f"plan.ring_attention={self.ring_attention!r} is not one of {', '.join(ATTENTION)}")
        out += self._context_problems()
        if self.heads % self.tp or self.kv_heads % self.tp or self.ffn % self.tp:
            out.append(f"tensor={self.tp} does not divide the heads ({self.heads}), KV heads ({self.kv_heads}) "
                       f"and FFN size ({self.ffn})")
        if self.layers % (self.pp * self.virtual_stages):
            out.append(f"pipeline x virtual stages = {self.pp}x{self.virtual_stages} does not divide the "
                       f"{self.layers} layers")
        if self.precision not in PRECISION:
            out.append(f"precision={self.precision!r} is not one of {', '.join(PRECISION)}")
        if self.zero not in (0, 1, 2, 3):
            out.append(f"zero_stage={self.zero} must be 0-3")
        if self.sp and self.tp == 1:
            out.append("sequence parallelism needs tensor > 1")
        if self.global_batch % (self.micro_batch * self.dp):
            out.append(f"global batch {self.global_batch} is not a multiple of micro-batch x data = "
                       f"{self.micro_batch}x{self.dp}")
        return out

    def _context_problems(self) -> list[str]:
        """The trainer's rules for context parallelism (pretrain/validate.py), in the planner's words."""
        if self.cp < 1:
            return [f"context={self.cp} must be at least 1"]
        if self.cp == 1:
            return []
        out = []
        if self.seq % (2 * self.cp):
            out.append(f"seq_length={self.seq} is not divisible by 2 x context = {2 * self.cp}: context parallelism "
                       f"cuts each sequence into {2 * self.cp} equal chunks (two per rank)")
        elif self.sp and self.local_seq % self.tp:
            out.append(f"seq_length / context = {self.seq}/{self.cp} = {self.local_seq} tokens per context rank is not "
                       f"divisible by tensor={self.tp}, which sequence parallelism splits them over")
        if self.attention_dropout:
            out.append(f"attention dropout with context={self.cp}: ring attention has none "
                       "(set model.attention_dropout=0 or context=1)")
        return out


# --- parameter counts -------------------------------------------------------------------------------

def layer_matmul_params(s: Spec) -> int:
    """Weights of one block that take part in a matmul (QKV, output, MLP), whole (not per TP rank)."""
    attention = s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim + s.heads * s.head_dim * s.hidden
    mlp = s.hidden * s.ffn * (3 if s.swiglu else 2)
    return attention + mlp


def layer_params(s: Spec) -> int:
    """All weights of one block: matmuls, biases and the two norms (LayerNorm has a bias, RMSNorm not)."""
    n = layer_matmul_params(s) + 2 * s.hidden * (2 if s.bias else 1)
    if s.bias:
        n += (s.heads + 2 * s.kv_heads) * s.head_dim + s.hidden + s.ffn * (2 if s.swiglu else 1) + s.hidden
    return n


def embedding_params(s: Spec) -> int:
    return s.vocab * s.hidden + s.learned_positions * s.hidden


def total_params(s: Spec) -> int:
    final_norm = s.hidden * (2 if s.bias else 1)
    head = 0 if s.tied else s.vocab * s.hidden
    return s.layers * layer_params(s) + embedding_params(s) + final_norm + head


# --- FLOPs ------------------------------------------------------------------------------------------

def layer_forward_flops(s: Spec) -> tuple[float, float]:
    """(matmul, attention-core) forward FLOPs of one block per token (the full s x s score matrix)."""
    return 2.0 * layer_matmul_params(s), 4.0 * s.seq * s.heads * s.head_dim


def model_flops_per_token(s: Spec) -> float:
    matmul, attention = layer_forward_flops(s)
    return 3 * (s.layers * (matmul + attention) + 2.0 * s.vocab * s.hidden)


def hardware_flops_per_token(s: Spec) -> float:
    """Model FLOPs plus what recomputation runs a second time."""
    matmul, attention = layer_forward_flops(s)
    extra = {"none": 0.0, "selective": attention, "full": matmul + attention}[s.recompute]
    return model_flops_per_token(s) + s.layers * extra


# --- from a composed training config ----------------------------------------------------------------

def _get(node: Any, key: str, default):
    value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    return default if value is None else value


def _flag(value) -> bool:
    return str(value).lower() not in ("false", "0", "no")


def from_config(cfg, extra: dict) -> Spec:
    """The Spec of a composed training config. ``extra`` holds ``plan.*`` settings the trainer config
    has no key for yet (virtual_stages, recompute=selective, attention, ring_attention, grad_bytes,
    unfused_rmsnorm, vocab).
    The precision is the trainer's (``trainer.precision``); fp32 training keeps fp32 gradients (4 bytes).
    Ring attention (``parallel.context`` > 1) runs the fused Triton block kernels on GPUs whatever the
    attention backend (``plan.ring_attention=materialized`` plans the PyTorch reference blocks instead)."""
    from pretrain.config import ffn_hidden_size, head_dim

    m, par, tr = cfg.model, cfg.parallel, cfg.trainer
    vocab = extra.get("vocab") or m.vocab_size or _get(_get(cfg.get("data", {}), "tokenizer", {}), "vocab_size", 0)
    if not vocab:
        raise PlanError("the vocabulary size is unknown: set model.vocab_size=V (or plan.vocab=V)")
    vocab = m.vocab_multiple * math.ceil(int(vocab) / m.vocab_multiple)
    checkpointing = _get(par, "activation_checkpointing", "none")
    recompute = {"none": "none", "full": "full", "every": "full", "selective": "selective"}.get(checkpointing, checkpointing)
    precision = _get(tr, "precision", "bf16")
    backend = _get(m, "attention_backend", "sdpa")
    attention = "materialized" if backend == "eager" else "flash"
    options = {
        "recompute": extra.get("recompute", recompute),
        "virtual_stages": int(extra.get("virtual_stages", _get(par, "virtual_stages", 1))),
        "attention": extra.get("attention", attention),
        "ring_attention": extra.get("ring_attention", "flash"),
        "grad_bytes": int(extra.get("grad_bytes", 4 if precision == "fp32" else 2)),
        "overlap_dp": _flag(extra.get("overlap_dp", True)),
        "unfused_rmsnorm": _flag(extra.get("unfused_rmsnorm", False)) and m.norm == "rmsnorm",
    }
    unknown = sorted(set(extra) - set(options) - {"vocab"})
    if unknown:
        raise PlanError(f"unknown planner key(s) {', '.join('plan.' + k for k in unknown)}; known: "
                        f"{', '.join('plan.' + k for k in sorted(set(options) | {'vocab'}))}")
    return Spec(
        layers=m.num_layers, hidden=m.hidden_size, heads=m.num_attention_heads,
        kv_heads=m.num_kv_heads or m.num_attention_heads, head_dim=head_dim(m), ffn=ffn_hidden_size(m),
        vocab=vocab, swiglu=m.activation == "swiglu", bias=bool(m.bias), tied=bool(m.tie_embeddings),
        learned_positions=m.max_position_embeddings if m.position_embedding == "learned" else 0,
        rope=m.position_embedding == "rope",
        dropout=(m.hidden_dropout or 0) > 0 or (m.attention_dropout or 0) > 0,
        attention_dropout=(m.attention_dropout or 0) > 0,
        seq=tr.seq_length, micro_batch=tr.micro_batch_size, global_batch=tr.global_batch_size,
        tp=par.tensor, pp=par.pipeline, dp=par.data, cp=int(_get(par, "context", 1)), zero=par.zero_stage,
        sp=bool(par.sequence_parallel),
        precision=precision, **options,
    )
