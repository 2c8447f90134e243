"""Per-GPU memory of a plan, in bytes, for the first and the last pipeline stage (the two that hold most).

Model states (ZeRO, Rajbhandari et al. 2020): bf16 weights 2 bytes, gradients ``grad_bytes`` (2 bf16,
4 for Megatron's fp32 main grads), Adam with an fp32 master copy 12 bytes (K = 12). ZeRO-1 shards the
12 over the data-parallel group, ZeRO-2 the gradients too, ZeRO-3 the weights too. fp32 training
(``precision="fp32"``, measured on CPU by tests/test_plan_calibration.py): 4-byte weights and
gradients; DeepSpeed's ZeRO optimizers still keep an fp32 master partition (K = 12 over the group),
plain torch Adam without ZeRO only its two moments (K = 8).

Activations per transformer layer and micro-batch (Korthikanti et al. 2022, Table 2 and section 4.1),
written per token so that GQA, SwiGLU and flash attention fit the same count: a part every TP rank
keeps whole without sequence parallelism (norm inputs, the QKV and FC1 inputs, dropout masks: 10 s b h
for GPT), a part split over TP (Q, K, V, the projection inputs, the MLP's inner activations: 24 s b h
for GPT), and the score matrix (5 a s^2 b: softmax output, dropout mask and output) when attention is
materialised. This framework's SwiGLU (silu(gate) * up in torch ops) keeps fc1's output, silu(gate) and
fc2's input (4 ffn elements), RoPE the rotated Q and K beside the QKV output and its cos/sin tables;
an unfused RMSNorm (Spec.unfused_rmsnorm) one more h and an fp32 rstd per norm. Element bytes follow
the precision (2 bf16, 4 fp32). Selective recompute drops the score part; full recompute keeps the layer input only
(2 s b h, split over TP with SP) plus one layer's working set during its backward.

1F1B keeps min(p, m) micro-batches in flight on the first stage, so it holds L layers' worth; the
interleaved schedule multiplies that by 1 + (p - 1)/(p v) for v virtual stages (Korthikanti section 4).
The last stage has one micro-batch in flight but holds the logits and the loss buffer, and the final
norm's and the LM head's inputs.

Context parallelism (cp ranks per sequence, ring attention; pretrain/model/ring_attention.py):

- every per-token term above (layer activations, logits and loss, the head's inputs, RoPE's cos/sin
  tables, full recompute's layer inputs) counts the s/cp tokens a rank holds, so at fixed b they are
  1/cp of cp = 1's. What does not shrink: model states (without ZeRO), the CUDA/NCCL overhead.
- the score term: the ring saves only q, k, v, the output and one fp32 log-sum-exp per head and token
  (4 a bytes, as flash attention), whichever block kernel it runs; a materialised score matrix is
  never kept for backward. Its working set is transient, one layer at a time, and goes to ``other``:
  the backward's fp32 dQ (4 a d per local token) and dK/dV accumulators, sent and received (2 x 2 x 4
  x 2 a_kv d), and K/V, held and received (2 x 2 x e x 2 a_kv d), all over TP; with the reference
  (materialised) blocks also one block's scores, c x c per head with c = s/(2 cp): the backward keeps
  the scores, P, dP, dP - delta and dS in fp32 at once (``RING_BLOCK_SCORE_BYTES``), b a/t c^2 x 20 bytes.
- ZeRO shards over the dp x cp ranks that hold the same weights (DeepSpeed's data-parallel group is
  data x context); without ZeRO every context rank keeps the full states, like a data-parallel one.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.plan.gpus import GPU
from pretrain.plan.spec import Spec, layer_params

GIB = 2.0**30
# PyTorch's caching allocator reserves more than it allocates while activations of different sizes
# come and go; 8% of the activation bytes is typical of the reserved/allocated ratio in training logs
# (torch.cuda.memory_stats at the peak of a 1F1B step). A judgement, not fitted to the rows here.
FRAGMENTATION = 0.08
# Logits per element: bf16 logits (2) + the fp32 copy the loss works in (4) + its fp32 softmax/gradient (4).
# fp32 (measured): the loss writes its softmax over the fp32 logits in place, so 4.
LOGIT_BYTES = 10
FP32_LOGIT_BYTES = 4
# Bytes per element of one ring block's score matrix live at once in the reference block backward
# (kernels/reference.py attention_block_backward): fp32 scores, P, dP, dP - delta and dS.
RING_BLOCK_SCORE_BYTES = 5 * 4


@dataclass(frozen=True)
class Memory:
    """Bytes on one GPU; ``stage`` says which pipeline stage this is ("first", "last" or "only")."""

    stage: str
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    other: float

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.states + self.activations + self.logits + self.other

    def gib(self) -> dict:
        keys = ("total", "weights", "grads", "optimizer", "activations", "logits", "other")
        return {k: round(getattr(self, k) / GIB, 3) for k in keys}


def stage_params(s: Spec, stage: str) -> float:
    """Parameters held by one GPU of a stage (TP splits matmuls and the vocabulary; positions are whole)."""
    layers = s.layers // s.pp * layer_params(s) / s.tp
    vocab = s.vocab * s.hidden / s.tp
    first = vocab + s.learned_positions * s.hidden
    # The last stage holds the LM head: its own matrix, or a copy of the tied embedding when pp > 1.
    last = vocab + s.hidden * (2 if s.bias else 1)
    if stage == "only":
        return layers + first + (0 if s.tied else vocab) + s.hidden * (2 if s.bias else 1)
    return layers + (first if stage == "first" else last)


def model_state_bytes(params: float, dp: int, zero: int, grad_bytes: int = 2,
                      precision: str = "bf16") -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes on one GPU for ``params`` parameters, ZeRO stage ``zero`` over ``dp``
    ranks: Rajbhandari et al.'s (2 + 2 + K) Psi / N_d terms with K = 12 (fp32: 4 + 4 + K, K = 8 without ZeRO)."""
    fp32 = precision == "fp32"
    weights = (4.0 if fp32 else 2.0) * params / (dp if zero >= 3 else 1)
    grads = grad_bytes * params / (dp if zero >= 2 else 1)
    optimizer = (8.0 if fp32 and zero == 0 else 12.0) * params / (dp if zero >= 1 else 1)
    return weights, grads, optimizer


def element_bytes(s: Spec) -> int:
    return 4 if s.precision == "fp32" else 2


def model_states(s: Spec, params: float) -> tuple[float, float, float]:
    """ZeRO shards over every rank holding the same weights: data x context."""
    return model_state_bytes(params, s.replicas, s.zero, s.grad_bytes, s.precision)


def layer_activation_bytes(s: Spec, recompute: str | None = None) -> float:
    """Bytes one layer keeps for backward for one micro-batch on one GPU (Korthikanti Table 2, generalised),
    for the s/cp tokens of each sequence this rank holds."""
    recompute = s.recompute if recompute is None else recompute
    tokens = s.local_seq * s.micro_batch
    h, d, e = s.hidden, s.head_dim, element_bytes(s)
    if recompute == "full":
        return e * tokens * h / (s.tp if s.sp else 1)
    masks = 2 * h if s.dropout else 0  # one byte per element after attention and after the MLP
    # Two norm inputs, the QKV input, the FC1 input; an unfused RMSNorm also its normalised input + rstd.
    replicated = e * (4 + (2 if s.unfused_rmsnorm else 0)) * h + masks + (8 if s.unfused_rmsnorm else 0)
    split = e * ((s.heads + 2 * s.kv_heads) * d + s.heads * d + (4 if s.swiglu else 2) * s.ffn)
    rope = 0.0
    if s.rope:  # the rotated Q and K, and each layer's cos and sin tables (s/cp x d, whole on every TP rank)
        split += e * (s.heads + s.kv_heads) * d
        rope = 2.0 * e * s.local_seq * d  # the positions this rank holds
    if recompute == "selective":
        scores = 0.0
    elif s.cp > 1:
        scores = 4.0 * s.heads  # the ring saves one fp32 log-sum-exp per head and token, whatever its blocks
    elif s.attention == "materialized":  # softmax out (+ dropout mask and output)
        scores = (2 * e + 1 if s.dropout else e) * s.heads * s.seq
    else:
        scores = 4.0 * s.heads  # flash attention keeps one fp32 log-sum-exp per head and token
    per_token = replicated / (s.tp if s.sp else 1) + (split + scores) / s.tp
    return tokens * per_token + rope


def in_flight(s: Spec) -> float:
    """Micro-batches' worth of activations the first stage holds at its peak (1F1B, interleaved)."""
    m = s.micro_batches
    if s.pp == 1:
        return 1.0
    if s.virtual_stages > 1:
        return s.pp * (1 + (s.pp - 1) / (s.pp * s.virtual_stages))
    return float(min(s.pp, m))


def activation_bytes(s: Spec, stage: str) -> float:
    """Transformer-layer activations held by one GPU of ``stage`` at its peak."""
    per_stage_layers = s.layers // s.pp
    micro = in_flight(s) if stage in ("first", "only") else 1.0
    held = per_stage_layers * micro * layer_activation_bytes(s)
    if s.recompute == "full":  # the layer being recomputed holds its full activations during its backward
        held += layer_activation_bytes(s, "none")
    return held


def logits_bytes(s: Spec) -> float:
    """The logits and loss buffers, and the final norm's and the LM head's inputs (whole on every TP rank)."""
    per_logit = FP32_LOGIT_BYTES if s.precision == "fp32" else LOGIT_BYTES
    head = element_bytes(s) * (3 if s.unfused_rmsnorm else 2) * s.hidden + (4 if s.unfused_rmsnorm else 0)
    return s.local_seq * s.micro_batch * (per_logit * s.vocab / s.tp + head)


def ring_buffer_bytes(s: Spec) -> float:
    """Ring attention's transient working set in one layer's backward (zero without CP): fp32 dQ, the
    dK/dV accumulators sent and received, K/V held and received, and with the reference (materialised)
    blocks one block's c x c scores per head (c = s/(2 cp)) in fp32."""
    if s.cp == 1:
        return 0.0
    e, d, tokens = element_bytes(s), s.head_dim, s.local_seq * s.micro_batch
    per_token = 4 * s.heads * d + 2 * (4 + e) * 2 * s.kv_heads * d
    scores = 0.0
    if s.ring_attention == "materialized":
        chunk = s.seq // (2 * s.cp)
        scores = RING_BLOCK_SCORE_BYTES * s.micro_batch * s.heads * chunk * chunk
    return (tokens * per_token + scores) / s.tp


def other_bytes(s: Spec, gpu: GPU, activations: float) -> float:
    """CUDA context, NCCL and cuBLAS workspaces, allocator slack; ZeRO-3's gathered weights (two layers,
    the one computing and the one prefetched); ring attention's working set."""
    gathered = 2 * element_bytes(s) * layer_params(s) / s.tp if s.zero >= 3 else 0.0
    return gpu.overhead_gib * GIB + FRAGMENTATION * activations + gathered + ring_buffer_bytes(s)


def stage_memory(s: Spec, gpu: GPU, stage: str) -> Memory:
    weights, grads, optimizer = model_states(s, stage_params(s, stage))
    activations = activation_bytes(s, stage)
    logits = logits_bytes(s) if stage in ("last", "only") else 0.0
    return Memory(stage, weights, grads, optimizer, activations, logits, other_bytes(s, gpu, activations))


def peak_memory(s: Spec, gpu: GPU) -> Memory:
    """The most loaded GPU: the only stage, or whichever of the first and last holds more."""
    if s.pp == 1:
        return stage_memory(s, gpu, "only")
    return max((stage_memory(s, gpu, st) for st in ("first", "last")), key=lambda mem: mem.total)
