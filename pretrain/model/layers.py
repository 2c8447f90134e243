"""Decoder building blocks on megatron-core tensor-parallel layers.

Activations are sequence-first, ``[s, b, h]`` (megatron-core's convention; sequence parallelism
shards dim 0). These files only say which projection is column- or row-parallel; process groups
come from megatron-core's ``parallel_state`` inside those layers.

Each top-level layer has a ``canonical_name`` ("embed", "blocks.3", ...) that does not depend on
the parallel layout; weight init and export key off it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.config import ModelConfig, ffn_hidden_size, head_dim  # noqa: F401 (re-exported)
from pretrain.model import attention as attn_ops
from pretrain.model import context
from pretrain.model.fused_loss import fused_lm_loss
from pretrain.model.recompute import recompute


def _no_init(weight):
    """Weights are filled later by ``init.apply_init`` from layout-independent full tensors."""


def _mark_sequence_parallel(module: nn.Module, enabled: bool) -> None:
    # Parameters used on a sequence shard get partial gradients on each TP rank; the engine
    # all-reduces gradients of parameters carrying this flag (see engine.apply_sequence_parallel_grad_sync).
    for p in module.parameters():
        p.sequence_parallel = enabled


def _apex_norm(cfg: ModelConfig) -> Optional[nn.Module]:
    """apex's fused LayerNorm/RMSNorm on GPU when the image has apex (same parameter names)."""
    if not torch.cuda.is_available() or cfg.attention_backend == "triton":
        return None
    try:
        from apex.normalization import FusedLayerNorm, FusedRMSNorm
    except ImportError:
        return None
    if cfg.norm == "layernorm":
        return FusedLayerNorm(cfg.hidden_size, eps=cfg.norm_eps) if cfg.bias else None
    return FusedRMSNorm(cfg.hidden_size, eps=cfg.norm_eps)


def build_norm(cfg: ModelConfig, sequence_parallel: bool) -> nn.Module:
    norm = _apex_norm(cfg)
    if norm is None and cfg.norm == "layernorm":
        norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.bias)
    elif norm is None:
        norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, backend=cfg.attention_backend)
    _mark_sequence_parallel(norm, sequence_parallel)
    return norm


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps
        self.backend = backend

    def forward(self, x):
        return attn_ops.rms_norm(x, self.weight, self.eps, self.backend)


def rope_cos_sin(seq: int, dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [seq, dim] in the rotate-half convention (GPT-NeoX / HF Llama), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


class Dropout(nn.Module):
    """Dropout that draws from the per-TP-rank RNG stream when activations are sequence-sharded."""

    def __init__(self, p: float, sequence_parallel: bool):
        super().__init__()
        self.p = p
        self.sequence_parallel = sequence_parallel

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        if self.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return _dropout(x, self.p)
        return _dropout(x, self.p)


def _dropout(x, p: float):
    # F.dropout's CPU path keeps its mask for backward in x's dtype; native_dropout draws the same
    # mask and keeps it as bool (1 byte), as the CUDA path does.
    return torch.native_dropout(x, p, True)[0]


class Attention(nn.Module):
    """Causal self-attention; QKV column-parallel, output row-parallel.

    The fused QKV output is laid out as [kv_head, group + 2, head_dim] (group = query heads per
    KV head: the group's queries, then its key, then its value), so splitting the columns into
    TP chunks gives every rank whole KV groups.
    """

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, layer_index: int):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        self.head_dim = head_dim(cfg)
        kv_heads = cfg.num_kv_heads or cfg.num_attention_heads
        self.kv_heads = kv_heads // tp  # per rank
        self.group = cfg.num_attention_heads // kv_heads
        self.cfg = cfg
        self.window = _window_for_layer(cfg, layer_index)
        self.layer_index = layer_index
        self.kv_cache = None  # set for incremental decoding (pretrain.interop.generate); training never uses it
        self.recompute_core = False  # selective recomputation (gpt.apply_activation_checkpointing)
        self.qkv = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size,
            kv_heads * (self.group + 2) * self.head_dim,
            config=mp,
            init_method=_no_init,
            bias=cfg.bias,
            gather_output=False,
        )
        self.proj = tensor_parallel.RowParallelLinear(
            cfg.num_attention_heads * self.head_dim,
            cfg.hidden_size,
            config=mp,
            init_method=_no_init,
            bias=cfg.bias,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        self.proj.weight.residual_output = True

    def forward(self, x, rope: Optional[tuple[torch.Tensor, torch.Tensor]], segments: Optional[torch.Tensor] = None):
        qkv, _ = self.qkv(x)  # [s, b, kv * (g + 2) * d] (full sequence after the SP all-gather)
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.kv_heads, self.group + 2, self.head_dim)
        q = qkv[:, :, :, : self.group].reshape(s, b, self.kv_heads * self.group, self.head_dim)
        k, v = qkv[:, :, :, self.group], qkv[:, :, :, self.group + 1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # (b, heads, s, d)
        if rope is not None:
            cos, sin = rope
            q, k = attn_ops.apply_rotary(q, k, cos.to(q.dtype), sin.to(q.dtype), self.cfg.attention_backend)
        if self.kv_cache is not None:
            past = self.kv_cache.length
            k, v = self.kv_cache.append(self.layer_index, k, v)  # (b, kv heads, past + s, d)
            out = _attention_after_prefix(q, k, v, past, self.window)
        elif self.recompute_core and torch.is_grad_enabled():
            out = recompute(self._core, q, k, v, segments)
        else:
            out = self._core(q, k, v, segments)
        out = out.permute(2, 0, 1, 3).reshape(s, b, -1)  # (s, b, heads * d)
        out, _ = self.proj(out)
        return out

    def _core(self, q, k, v, segments):
        """softmax(q k^T / sqrt(d)) v with dropout: (b, heads, s, d) -> (b, heads, s, d); segments [b, s] or None."""
        if context.world_size() > 1:  # validated: no attention dropout under context parallelism
            return context.attention(q, k, v, self.window, segments, self.cfg.attention_backend)
        dropout = self.cfg.attention_dropout if self.training else 0.0
        if dropout > 0.0:
            with tensor_parallel.get_cuda_rng_tracker().fork():  # heads differ per TP rank
                return attn_ops.attention(q, k, v, self.window, dropout, self.cfg.attention_backend, segments)
        return attn_ops.attention(q, k, v, self.window, 0.0, self.cfg.attention_backend, segments)


def _attention_after_prefix(q, k, v, past: int, window: Optional[int]) -> torch.Tensor:
    """q (b, h, s, d) at positions past .. past + s - 1 over keys (b, hkv, past + s, d); no dropout."""
    allowed = attn_ops.causal_mask(q.shape[2], k.shape[2], window, q.device, offset=past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=k.shape[1] != q.shape[1])


class MLP(nn.Module):
    """GELU or SwiGLU MLP; first projection column-parallel, second row-parallel.

    For SwiGLU the first projection's full weight is [gate; up] and it is split with stride 2
    (megatron-core's convention): each TP rank holds [gate_r; up_r], matching halves.
    """

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        ffn = ffn_hidden_size(cfg)
        self.gated = cfg.activation == "swiglu"
        self.fc1 = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size, ffn * (2 if self.gated else 1), config=mp, init_method=_no_init,
            bias=cfg.bias, gather_output=False,
        )
        if self.gated:
            for p in self.fc1.parameters():
                p.partition_stride = 2
        self.fc2 = tensor_parallel.RowParallelLinear(
            ffn, cfg.hidden_size, config=mp, init_method=_no_init, bias=cfg.bias,
            input_is_parallel=True, skip_bias_add=False,
        )
        self.fc2.weight.residual_output = True

    def forward(self, x):
        h, _ = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        out, _ = self.fc2(h)
        return out


def _window_for_layer(cfg: ModelConfig, index: int) -> Optional[int]:
    which = cfg.local_attention_layers
    if cfg.local_window is None or which == "none":
        return None
    if which == "all" or (which == "odd") == (index % 2 == 1):
        return cfg.local_window
    return None


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)); or PaLM's parallel form."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, index: int):
        super().__init__()
        self.canonical_name = f"blocks.{index}"
        self.cfg = cfg
        sp = mp.sequence_parallel
        self.ln1 = build_norm(cfg, sp)
        self.attn = Attention(cfg, mp, index)
        if not cfg.parallel_block:
            self.ln2 = build_norm(cfg, sp)
        self.mlp = MLP(cfg, mp)
        self.dropout = Dropout(cfg.hidden_dropout, sp)
        self.activation_checkpoint = False
        # Under SP the block sees [s / tp, b, h]; rotary tables cover the full sequence.
        self._seq_factor = mp.tensor_model_parallel_size if sp else 1
        self._rope: Optional[tuple] = None

    def _rope_tables(self, x):
        if self.cfg.position_embedding != "rope":
            return None
        past = 0 if self.attn.kv_cache is None else self.attn.kv_cache.length
        local = x.shape[0] * self._seq_factor  # this rank's tokens (a context shard of the sequence)
        cp = context.world_size()
        seq = local * cp + past
        if self._rope is None or self._rope[0].shape[0] < seq or self._rope[0].device != x.device:
            self._rope = rope_cos_sin(seq, self.attn.head_dim, self.cfg.rope_theta, x.device)
        cos, sin = self._rope
        if cp > 1:  # the positions of this rank's two chunks
            held = context.positions(local, x.device)
            return cos[held], sin[held]
        return cos[past:seq], sin[past:seq]

    def _forward(self, x, segments):
        rope = self._rope_tables(x)
        if self.cfg.parallel_block:
            h = self.ln1(x)
            return x + self.dropout(self.attn(h, rope, segments)) + self.dropout(self.mlp(h))
        x = x + self.dropout(self.attn(self.ln1(x), rope, segments))
        return x + self.dropout(self.mlp(self.ln2(x)))

    def forward(self, x, segments: Optional[torch.Tensor] = None):
        """x [s/tp if SP else s, b, h]; segments [b, s] (document index per token) keeps attention
        within documents (``model.document_mask``)."""
        if self.activation_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, segments, use_reentrant=False)
        return self._forward(x, segments)


class WordEmbedding(nn.Module):
    """Vocabulary-parallel token embedding: tokens [b, s] -> [b, s, h] (summed over TP ranks).

    With tied embeddings the same module computes the output logits (``logits``).
    """

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, padded_vocab: int):
        super().__init__()
        self.canonical_name = "embed"
        self.word = tensor_parallel.VocabParallelEmbedding(
            padded_vocab, cfg.hidden_size, init_method=_no_init, config=mp
        )
        self.sequence_parallel = mp.sequence_parallel
        self.fused_loss_chunk = cfg.fused_loss_chunk if cfg.fused_loss else None

    def forward(self, tokens):
        """tokens [b, s] (the full sequence; this rank's context shard is taken here)."""
        return self.word(context.shard(tokens, 1))

    def loss(self, x, labels):
        """Tied output and mean loss fused (``fused_lm_loss``): x [s/tp if SP else s, b, h], labels [b, s]."""
        return fused_lm_loss(x, self.word.weight, labels, self.fused_loss_chunk, self.sequence_parallel)

    def logits(self, x):
        """x: [s/tp if SP else s, b, h] -> logits [s, b, vocab/tp]."""
        if self.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(x)
        else:
            x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
        return F.linear(x, self.word.weight)


class EmbeddingOutput(nn.Module):
    """Adds learned positions, goes sequence-first, shards the sequence under SP, applies dropout."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        self.canonical_name = "embed_out"
        self.pos = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.position_embedding == "learned" else None
        self.sequence_parallel = mp.sequence_parallel
        self.dropout = Dropout(cfg.hidden_dropout, mp.sequence_parallel)
        self.kv_cache = None  # incremental decoding: positions continue after the cached tokens

    def forward(self, x):  # x: [b, s, h]
        if self.pos is not None and self.kv_cache is not None:
            start = self.kv_cache.length
            x = x + self.pos(torch.arange(start, start + x.shape[1], device=x.device))
        elif self.pos is not None:
            x = x + self.pos(context.positions(x.shape[1], x.device))
        x = x.transpose(0, 1).contiguous()  # (s, b, h)
        if self.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        return self.dropout(x)


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        self.canonical_name = "final_norm"
        self.norm = build_norm(cfg, mp.sequence_parallel)

    def forward(self, x):
        return self.norm(x)


class OutputLayer(nn.Module):
    """Untied LM head: column-parallel over the vocabulary (all-gathers the sequence under SP)."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, padded_vocab: int):
        super().__init__()
        self.canonical_name = "output"
        self.linear = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size, padded_vocab, config=mp, init_method=_no_init, bias=False, gather_output=False
        )
        self.sequence_parallel = mp.sequence_parallel
        self.fused_loss_chunk = cfg.fused_loss_chunk if cfg.fused_loss else None

    def forward(self, x):
        logits, _ = self.linear(x)
        return logits

    def loss(self, x, labels):
        """Output layer and mean loss fused (``fused_lm_loss``): x [s/tp if SP else s, b, h], labels [b, s]."""
        return fused_lm_loss(x, self.linear.weight, labels, self.fused_loss_chunk, self.sequence_parallel)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss. logits [s, b, vocab/tp], labels [b, s]."""
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous())
    return losses.mean()
