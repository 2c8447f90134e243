"""Step time of a plan, in seconds, split into the terms the planner reports.

Per micro-batch and transformer layer on one GPU:

- GEMMs: the layer's projections (QKV, output, FC1, FC2) per TP rank, 2 m n k FLOPs each at the GPU's
  achieved efficiency for that shape (``GPU.gemm_efficiency``); the backward runs twice the FLOPs.
- attention core: flash attention at ``flash_eff`` of peak on the counted FLOPs (backward 2.5x the
  forward time: it recomputes the scores and runs five GEMMs to the forward's two); a materialised
  score matrix costs its two batched GEMMs plus the memory traffic of the fused softmax and dropout
  over a s^2 per head (``SCORE_BYTES``).
- memory-bound kernels (norms, bias-dropout-add, activation, RoPE) at ``hbm_eff`` of HBM bandwidth;
  split over TP with sequence parallelism, replicated without.
- TP collectives: two per layer forward and two backward of s b h bf16 (all-reduce, or reduce-scatter
  + all-gather with SP: the same ring volume), on the critical path (``TP_BACKWARD_EXPOSED``).
- recompute: full reruns the layer's forward (with its collectives) in the backward; selective reruns
  the attention core only.

Per step: m micro-batches through the slowest stage, plus the 1F1B bubble ((p - 1)/v stage-times of
fill and drain, so the fraction is (p - 1)/(v m + p - 1)), point-to-point sends at each stage boundary,
data-parallel gradient reduction (and ZeRO's all-gathers) over the network, hidden behind the last
micro-batch's backward when the plan overlaps it, and the Adam step (memory-bound over the local shard).

Context parallelism (cp ranks per sequence, pretrain/model/ring_attention.py):

- everything per token (GEMMs, memory-bound kernels, TP collectives, the head, pipeline sends) runs on
  the s/cp tokens of each sequence a rank holds.
- attention core: the load-balanced chunks give every rank the same causal work. Fused (flash) blocks:
  1/cp of the full sequence's counted FLOPs at ``flash_eff``. Reference (materialised) blocks: each
  rank computes 2 cp + 1 whole c x c blocks per head (c = s/(2 cp); 3 at the first ring step, 2 at
  each later one), their two GEMMs plus fp32 score traffic (``RING_SCORE_BYTES``; backward twice).
- ring traffic per layer and micro-batch, each transfer one K and one V block of b x a_kv/t x s/cp x d
  elements (dK and dV in fp32): forward cp - 1 K/V transfers, each overlapped with one ring step's
  blocks; backward cp - 1 K/V transfers, overlapped likewise, and cp dK/dV transfers, which the
  implementation posts after the step's blocks and waits for at once (so nothing hides them). Exposed:
  sum over the overlapped steps of max(0, transfer - that step's block compute), plus every dK/dV hop.
  A CP group spans tp x cp consecutive ranks: NVLink within a node, else one NIC rail per hop
  (``Cluster.hop``). Recompute (selective or full) runs the forward ring again. Reported as ``cp_comm``.
- gradient reduction and ZeRO's collectives run over the dp x cp ranks that hold the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.plan.gpus import Cluster
from pretrain.plan.spec import Spec
from pretrain.plan import memory

# Bytes moved per score element by the unfused attention core, forward: QK^T writes it (2), the fused
# scale-mask-softmax reads and writes it (4), dropout reads it, writes it and its mask (5), AV reads it (2).
SCORE_BYTES = {True: 13, False: 8}  # with / without attention dropout; the backward moves twice as much
FLASH_BACKWARD = 2.5
# Adam per parameter: fp32 master, momentum and variance read and written (24 bytes) and the bf16 weight
# written back (2); the gradient is read twice more (the norm for clipping, the update): 2 x grad_bytes.
ADAM_BYTES = 26
# Forward + backward of the memory-bound kernels over the forward alone. Korthikanti Table 4: sequence
# parallelism, which splits exactly these kernels over TP, saves 0.5 ms of the 22B layer's forward and
# 0.1 ms of its backward, so their backward costs about as much as their forward (fused dgrad kernels).
ELEMENTWISE_FWD_BWD = 2.0
# NCCL kernels overlapped with compute still take SMs and HBM bandwidth from it: this fraction of the
# hidden communication time shows in the step (ZeRO-2/3 per-micro-batch traffic, overlapped DP reduction).
# A judgement (NCCL's ring kernels hold ~8-16 of 108-132 SMs while they run), not fitted; with it the
# two MosaicML ZeRO-3 rows land at -4% and +2%.
OVERLAP_COST = 0.3
# Of the backward's two TP collectives per layer, the share not hidden behind the weight-gradient GEMM.
# megatron-core can overlap the column-parallel dgrad all-reduce with it, but the fit to the TP=8 rows
# (Korthikanti Table 5, Narayanan Table 1) prefers none hidden (max error 4.7% against 5.3% at 0.5).
TP_BACKWARD_EXPOSED = 1.0
# No kernel finishes faster than its launch and tail (~5 us without CUDA graphs): what bounds tiny models.
LAUNCH = 5e-6
# Bytes moved per score element by one reference ring block forward (kernels/reference.py, fp32): the
# unfused path's 8 without dropout, at twice the element size.
RING_SCORE_BYTES = 2 * SCORE_BYTES[False]


@dataclass(frozen=True)
class StepTime:
    compute: float
    recompute: float
    tp_comm: float
    pp_bubble: float
    pp_p2p: float
    dp_comm: float
    optimizer: float
    cp_comm: float = 0.0  # ring attention's exposed transfers

    @property
    def total(self) -> float:
        return (self.compute + self.recompute + self.tp_comm + self.cp_comm + self.pp_bubble + self.pp_p2p
                + self.dp_comm + self.optimizer)

    def breakdown(self) -> dict:
        keys = ("compute", "recompute", "tp_comm", "cp_comm", "pp_bubble", "pp_p2p", "dp_comm", "optimizer")
        return {k: round(getattr(self, k), 5) for k in keys}


def _gemm(c: Cluster, m: int, n: int, k: int) -> float:
    return max(LAUNCH, 2.0 * m * n * k / (c.gpu.peak_flops * c.gpu.gemm_efficiency(m, n, k)))


def _hbm(c: Cluster, nbytes: float) -> float:
    return max(LAUNCH, nbytes / (c.gpu.hbm_bw * c.gpu.hbm_eff))


def layer_gemms(s: Spec, c: Cluster) -> float:
    """Forward time of one layer's projections for one micro-batch on one TP rank."""
    tokens, h, d, t = s.local_seq * s.micro_batch, s.hidden, s.head_dim, s.tp
    fc1 = s.ffn * (2 if s.swiglu else 1)
    return (_gemm(c, tokens, (s.heads + 2 * s.kv_heads) * d // t, h) + _gemm(c, tokens, h, s.heads * d // t)
            + _gemm(c, tokens, fc1 // t, h) + _gemm(c, tokens, h, s.ffn // t))


def attention_core(s: Spec, c: Cluster) -> tuple[float, float]:
    """(forward, backward) time of QK^T, softmax (+ dropout) and AV for one micro-batch on one TP rank
    (with CP: this rank's share of the ring's blocks)."""
    heads = s.micro_batch * s.heads // s.tp  # independent (s x s) problems on this rank
    flops = 4.0 * heads * s.seq * s.seq * s.head_dim / s.cp  # the ring balances the causal work
    if s.kernel == "flash":
        forward = flops / (c.gpu.peak_flops * c.gpu.flash_eff)
        return forward, FLASH_BACKWARD * forward
    if s.cp > 1:  # the reference blocks: 2 cp + 1 whole c x c blocks per head, scores in fp32
        chunk, blocks = s.seq // (2 * s.cp), 2 * s.cp + 1
        gemms = heads * blocks * (_gemm(c, chunk, chunk, s.head_dim) + _gemm(c, chunk, s.head_dim, chunk))
        traffic = _hbm(c, RING_SCORE_BYTES * heads * blocks * chunk * chunk)
        return gemms + traffic, 2 * (gemms + traffic)
    gemms = heads * (_gemm(c, s.seq, s.seq, s.head_dim) + _gemm(c, s.seq, s.head_dim, s.seq))
    traffic = _hbm(c, SCORE_BYTES[s.dropout] * heads * s.seq * s.seq)
    return gemms + traffic, 2 * (gemms + traffic)


def elementwise(s: Spec, c: Cluster) -> float:
    """Forward time of the memory-bound kernels of one layer for one micro-batch on one TP rank."""
    h, t = s.hidden, s.tp
    # Two norms (read + write), two bias-dropout-adds (input, residual, output, and a mask with dropout).
    replicated = 8 * h + 2 * (6 * h + (h if s.dropout else 0))
    split = (6 if s.swiglu else 4) * s.ffn  # the activation function reads its input(s), writes its output
    if s.rope:
        split += 4 * (s.heads + s.kv_heads) * s.head_dim  # RoPE rewrites q and k
    per_token = replicated / (t if s.sp else 1) + split / t
    return _hbm(c, per_token * s.local_seq * s.micro_batch)


def tp_collectives(s: Spec, c: Cluster) -> float:
    """One layer-forward's two TP collectives (all-reduce, or RS + AG with SP) of s b h bf16 values."""
    if s.tp == 1:
        return 0.0
    bw, latency = c.link(s.tp, 1)
    nbytes = 2.0 * s.local_seq * s.micro_batch * s.hidden
    ops = 4 if s.sp else 2  # RS + AG per all-reduce: the same ring volume, twice the launches
    return 2 * (s.tp - 1) / s.tp * 2 * nbytes / bw + ops * latency


def head_time(s: Spec, c: Cluster) -> float:
    """LM head forward + backward and the loss for one micro-batch, on the last stage."""
    tokens = s.local_seq * s.micro_batch
    gemm = _gemm(c, tokens, s.vocab // s.tp, s.hidden)
    loss = _hbm(c, 2 * memory.LOGIT_BYTES * tokens * s.vocab / s.tp)
    return 3 * gemm + loss


def ring_step_shares(s: Spec) -> list[float]:
    """The fraction of a rank's attention-core time at each of the cp ring steps: even for the fused
    blocks (the first step's two causal diagonal blocks and one whole one make two blocks' work, as
    every later step's two whole blocks), 3 and then 2 of the 2 cp + 1 reference blocks."""
    if s.kernel == "flash":
        return [1.0 / s.cp] * s.cp
    blocks = 2 * s.cp + 1
    return [3.0 / blocks] + [2.0 / blocks] * (s.cp - 1)


def ring_transfers(s: Spec, c: Cluster) -> tuple[float, float]:
    """(K/V, dK/dV) time of one ring hop: a K and a V block (b x a_kv/t x s/cp x d) in the element
    dtype, or the fp32 dK and dV accumulators of the same shape, to the neighbour rank."""
    bw, latency = c.hop(s.tp * s.cp)
    elements = 2.0 * s.micro_batch * (s.kv_heads // s.tp) * s.local_seq * s.head_dim
    return elements * memory.element_bytes(s) / bw + latency, elements * 4 / bw + latency


def ring_exposed(s: Spec, c: Cluster) -> tuple[float, float]:
    """(forward, backward) ring time of one layer and micro-batch that the attention blocks do not hide.

    Forward: cp - 1 K/V hops, each overlapping one step's blocks. Backward: cp - 1 K/V hops overlapped
    the same way, then cp dK/dV hops, each waited for right after its step's blocks (exposed whole)."""
    if s.cp == 1:
        return 0.0, 0.0
    kv, dkv = ring_transfers(s, c)
    att_f, att_b = attention_core(s, c)
    shares = ring_step_shares(s)[: s.cp - 1]  # the steps during which the next K/V is in flight
    forward = sum(max(0.0, kv - share * att_f) for share in shares)
    backward = sum(max(0.0, kv - share * att_b) for share in shares) + s.cp * dkv
    return forward, backward


@dataclass(frozen=True)
class LayerTime:
    compute: float  # forward + backward of GEMMs, attention core and memory-bound kernels
    recompute: float
    tp_comm: float
    cp_comm: float = 0.0  # ring attention's exposed transfers (forward, backward and any recompute)


def layer_time(s: Spec, c: Cluster) -> LayerTime:
    gemms, elems, comm = layer_gemms(s, c), elementwise(s, c), tp_collectives(s, c)
    att_f, att_b = attention_core(s, c)
    ring_f, ring_b = ring_exposed(s, c)
    compute = 3 * gemms + att_f + att_b + ELEMENTWISE_FWD_BWD * elems
    recompute = {"none": 0.0, "selective": att_f, "full": gemms + att_f + elems + comm}[s.recompute]
    ring = ring_f + ring_b + (ring_f if s.recompute != "none" else 0.0)
    return LayerTime(compute, recompute, comm + TP_BACKWARD_EXPOSED * comm, ring)


def dp_time(s: Spec, c: Cluster) -> tuple[float, float]:
    """(per step, per micro-batch) time of the data-parallel collectives of one GPU's gradients/weights.

    ZeRO 0/1 reduce the accumulated gradients once per step (ZeRO-1 then all-gathers the updated bf16
    weights); DeepSpeed's ZeRO-2 reduce-scatters each micro-batch's gradients as they are produced and
    ZeRO-3 also all-gathers the weights in the forward and again in the backward of every micro-batch.
    The group is every rank holding the same weights: dp x cp, adjacent after TP (stride tp).
    """
    n = s.replicas
    if n == 1:
        return 0.0, 0.0
    bw, latency = c.link(n, s.tp)
    params = memory.stage_params(s, "first" if s.pp > 1 else "only")
    ring = (n - 1) / n / bw
    grads = s.grad_bytes * params * ring  # one reduce-scatter (or half an all-reduce)
    weights = 2.0 * params * ring  # one all-gather of bf16 weights
    if s.zero == 0:
        return 2 * grads + 2 * latency, 0.0  # one all-reduce = reduce-scatter + all-gather of the gradients
    if s.zero == 1:
        return grads + weights + 2 * latency, 0.0
    if s.zero == 2:
        return weights + latency, grads + latency
    return 0.0, grads + 2 * weights + 3 * latency


def optimizer_time(s: Spec, c: Cluster) -> float:
    params = memory.stage_params(s, "first" if s.pp > 1 else "only") / (s.replicas if s.zero >= 1 else 1)
    return _hbm(c, (ADAM_BYTES + 2 * s.grad_bytes) * params)


def step_time(s: Spec, c: Cluster) -> StepTime:
    m, p, v = s.micro_batches, s.pp, s.virtual_stages
    lt = layer_time(s, c)
    per_stage = s.layers // p
    head = head_time(s, c)
    # The slowest stage sets the pace: the last (it runs the head), or the only one.
    compute_mb = per_stage * lt.compute + head
    recompute_mb = per_stage * lt.recompute
    tp_mb = per_stage * lt.tp_comm
    cp_mb = per_stage * lt.cp_comm
    stage_mb = compute_mb + recompute_mb + tp_mb + cp_mb
    step_dp, micro_dp = dp_time(s, c)
    # ZeRO-2/3 traffic of a micro-batch overlaps that micro-batch's compute; only the excess shows.
    micro_excess = max(OVERLAP_COST * micro_dp, micro_dp - stage_mb) if s.overlap_dp else micro_dp
    backward_last = per_stage * (lt.compute * 2 / 3 + lt.recompute)
    step_excess = max(OVERLAP_COST * step_dp, step_dp - backward_last) if s.overlap_dp else step_dp
    stage_time = per_stage * (lt.compute + lt.recompute + lt.tp_comm + lt.cp_comm)
    bubble = (p - 1) / v * (stage_time + head / p) if p > 1 else 0.0
    p2p = 0.0
    if p > 1:
        bw, latency = c.link(p, s.tp * s.cp * s.dp)
        # Megatron splits the boundary tensor over the TP ranks and all-gathers it over NVLink after.
        nbytes = 2.0 * s.local_seq * s.micro_batch * s.hidden / s.tp
        p2p = (m + p - 1) * 2 * v * (nbytes / bw + latency)
    return StepTime(compute=m * compute_mb, recompute=m * recompute_mb, tp_comm=m * tp_mb, pp_bubble=bubble,
                    pp_p2p=p2p, dp_comm=step_excess + m * micro_excess, optimizer=optimizer_time(s, c),
                    cp_comm=m * cp_mb)
