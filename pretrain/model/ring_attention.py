"""Ring attention for context parallelism (CP): exact causal attention over a sequence split across ranks.

Layout (load-balanced causal chunks): a sequence of S tokens is cut into 2N chunks of c = S / (2N)
tokens; CP rank r holds chunk r and chunk 2N-1-r, in that order (local length L = 2c). Every rank
then has the same amount of causal work.

Forward: each rank keeps its queries and passes K/V (and the owner's document ids) to the next rank
(r -> r+1) for N-1 steps, computing on the block it holds while the next one is in flight, and
merges the partial (out, logsumexp) pairs in float32. Backward runs the same ring again, this time
carrying dK/dV accumulators with K/V, so after N hops each accumulator is back with its owner;
dQ stays local. A step's block gradients go to a fresh buffer while the accumulator they join is
still on its way from the previous rank, so the dK/dV hops overlap the block compute too. Work is per chunk pair (2 query chunks x 2 KV chunks per step); pairs that
positions and the window alone mask fully are skipped (``ring_plan``).

All ranks of the CP group call ``ring_attention`` together, in the same order (it communicates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor


def _check_divisible(seq_len: int, cp_size: int) -> None:
    if cp_size < 1:
        raise ValueError(f"context parallel size must be >= 1, got {cp_size}")
    if seq_len % (2 * cp_size) != 0:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2 * context parallel size = {2 * cp_size} "
            f"(each of the {cp_size} CP ranks holds two of {2 * cp_size} equal chunks); choose a sequence "
            f"length that is a multiple of {2 * cp_size}, or a context parallel size that divides {seq_len // 2}"
        )


def chunk_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.LongTensor:
    """The absolute positions (long, [2c] with c = seq_len / (2 * cp_size)) that CP rank ``cp_rank``
    holds, in local order: chunk cp_rank, then chunk 2 * cp_size - 1 - cp_rank."""
    _check_divisible(seq_len, cp_size)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, {cp_size})")
    c = seq_len // (2 * cp_size)
    first, second = cp_rank * c, (2 * cp_size - 1 - cp_rank) * c
    return torch.cat([torch.arange(first, first + c), torch.arange(second, second + c)])


def shard_sequence(x: Tensor, dim: int, cp_size: int, cp_rank: int) -> Tensor:
    """This CP rank's part of ``x`` along the sequence dimension ``dim`` (contiguous)."""
    index = chunk_positions(x.shape[dim], cp_size, cp_rank).to(x.device)
    return x.index_select(dim, index).contiguous()


def unshard_sequence(parts: list[Tensor], dim: int) -> Tensor:
    """Inverse of ``shard_sequence``: ``parts[r]`` is CP rank r's part; returns the full sequence."""
    cp_size = len(parts)
    full = torch.cat(parts, dim=dim)
    order = torch.cat([chunk_positions(full.shape[dim], cp_size, r) for r in range(cp_size)])
    return full.index_select(dim, torch.argsort(order).to(full.device))


class BlockPair(NamedTuple):
    """One (query chunk, KV chunk) block: indices 0/1 into the local chunks and absolute start positions."""

    q_chunk: int
    kv_chunk: int
    q_start: int
    k_start: int


@dataclass
class RingPlan:
    """The blocks one CP rank computes: ``steps[t]`` lists the pairs for the KV of CP rank
    (cp_rank - t) mod cp_size; ``skipped`` counts pairs masked fully by position and window."""

    steps: list[list[BlockPair]] = field(default_factory=list)
    skipped: int = 0

    @property
    def computed(self) -> int:
        return sum(len(s) for s in self.steps)


def ring_plan(seq_len: int, cp_size: int, cp_rank: int, window: Optional[int]) -> RingPlan:
    """Which chunk pairs CP rank ``cp_rank`` computes at each ring step (no document ids involved).

    A pair is skipped when every key comes after every query (causal), or every key is at least
    ``window`` positions before every query. Without a window the whole group computes
    cp_size * (2 * cp_size + 1) of its 4 * cp_size^2 pairs, evenly: 3 on the first step, 2 after.
    """
    _check_divisible(seq_len, cp_size)
    c = seq_len // (2 * cp_size)

    def starts(rank):
        return rank * c, (2 * cp_size - 1 - rank) * c

    plan = RingPlan()
    for step in range(cp_size):
        pairs = []
        for qi, q_start in enumerate(starts(cp_rank)):
            for ki, k_start in enumerate(starts((cp_rank - step) % cp_size)):
                after = k_start > q_start + c - 1
                too_old = window is not None and q_start - (k_start + c - 1) >= window
                if after or too_old:
                    plan.skipped += 1
                else:
                    pairs.append(BlockPair(qi, ki, q_start, k_start))
        plan.steps.append(pairs)
    return plan


class _BlockOps(NamedTuple):
    forward: Callable  # (q, k, v, q_start, k_start, q_segments, k_segments) -> (out, lse)
    backward: Callable  # (grad_out, q, k, v, lse, delta, q_start, k_start, q_segments, k_segments) -> (dq, dk, dv)


def _block_ops(backend: str, window: Optional[int], scale: float) -> _BlockOps:
    """The block kernels: ``pretrain_kernels``' block ops, which run Triton on GPUs and the PyTorch
    reference on CPU tensors (the kernel package's backend setting decides; tests force Triton under
    the interpreter). Every model attention backend uses them: no PyTorch attention returns the
    log-sum-exp the merge needs."""
    import pretrain_kernels as pk

    if backend not in ("sdpa", "eager", "triton"):
        raise ValueError(f"ring_attention: unknown attention backend {backend!r}; expected 'sdpa', 'eager' or 'triton'")

    def forward(q, k, v, q_start, k_start, qs, ks):
        return pk.attention_block_forward(q, k, v, q_start=q_start, k_start=k_start, window=window,
                                          scale=scale, q_segments=qs, k_segments=ks)

    def backward(do, q, k, v, lse, delta, q_start, k_start, qs, ks):
        return pk.attention_block_backward(do, q, k, v, lse, delta, q_start=q_start, k_start=k_start,
                                           window=window, scale=scale, q_segments=qs, k_segments=ks)

    return _BlockOps(forward, backward)


class _Ring:
    """Point-to-point neighbours in the CP group: send to rank + 1, receive from rank - 1."""

    def __init__(self, group):
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        if self.size > 1:
            self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
            self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, tensors: list[Tensor], tag: int = 0) -> "_Transfer":
        """Post sends of ``tensors`` to the next rank and receives of same-shaped buffers from the
        previous one. Transfers in flight together get distinct tags (gloo matches messages by tag)."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i) for i, t in enumerate(received)]
        return _Transfer(tensors, received, dist.batch_isend_irecv(ops))


class _Transfer:
    """One posted exchange; holds the sent tensors until it completes."""

    def __init__(self, sent: list[Tensor], received: list[Tensor], requests: list):
        self.sent, self.received, self.requests = sent, received, requests

    def wait(self) -> list[Tensor]:
        """The received tensors, once both directions have completed."""
        for r in self.requests:
            r.wait()
        self.sent = []
        return self.received


def _chunks(x: Tensor, dim: int) -> Tensor:
    """[.., 2c, ..] along ``dim`` -> [2, .., c, ..] (contiguous): the two local chunks, each contiguous."""
    return torch.stack(x.chunk(2, dim=dim))


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators and statistics: float32, float64 for float64 inputs (the kernels' compute dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """In place: (out, lse) <- softmax-weighted merge with a block's (out, lse); -inf lse = no keys yet."""
    new = torch.logaddexp(lse, block_lse)
    safe = new.nan_to_num(neginf=0.0)  # rows without keys so far: both weights exp(-inf) = 0
    out.mul_(torch.exp(lse - safe).unsqueeze(-1))
    out.add_(block_out.to(out.dtype) * torch.exp(block_lse - safe).unsqueeze(-1))
    lse.copy_(new)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segments, group, window, scale, backend):
        ring = _Ring(group)
        ops = _block_ops(backend, window, scale)
        b, hq, local_len, d = q.shape
        plan = ring_plan(local_len * ring.size, ring.size, ring.rank, window)
        qc = _chunks(q, 2)  # (2, b, hq, c, d)
        kv = torch.stack([_chunks(k, 2), _chunks(v, 2)])  # (2 k/v, 2 chunks, b, hkv, c, d)
        qseg = None if segments is None else _chunks(segments, 1)  # (2, b, c)
        ct = _stat_dtype(q.dtype)
        out = torch.zeros(qc.shape, dtype=ct, device=q.device)
        lse = torch.full(qc.shape[:-1], float("-inf"), dtype=ct, device=q.device)  # (2, b, hq, c)
        kseg = qseg
        for step, pairs in enumerate(plan.steps):
            incoming = ring.start([kv] if kseg is None else [kv, kseg]) if step + 1 < ring.size else None
            for p in pairs:
                block_out, block_lse = ops.forward(
                    qc[p.q_chunk], kv[0, p.kv_chunk], kv[1, p.kv_chunk], p.q_start, p.k_start,
                    None if qseg is None else qseg[p.q_chunk], None if kseg is None else kseg[p.kv_chunk])
                _merge(out[p.q_chunk], lse[p.q_chunk], block_out, block_lse.to(ct))
            if incoming is not None:
                kv, *rest = incoming.wait()
                kseg = rest[0] if rest else None
        out = torch.cat(out.unbind(0), dim=2).to(q.dtype)  # (b, hq, L, d)
        lse = torch.cat(lse.unbind(0), dim=2)  # (b, hq, L)
        ctx.save_for_backward(q, k, v, out, lse, segments)
        ctx.group, ctx.window, ctx.scale, ctx.backend = group, window, scale, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, segments = ctx.saved_tensors
        ring = _Ring(ctx.group)
        ops = _block_ops(ctx.backend, ctx.window, ctx.scale)
        local_len = q.shape[2]
        plan = ring_plan(local_len * ring.size, ring.size, ring.rank, ctx.window)
        ct = _stat_dtype(q.dtype)
        delta = (grad_out.to(ct) * out.to(ct)).sum(-1)  # (b, hq, L): rowsum(dO * O), FlashAttention-2
        qc, doc = _chunks(q, 2), _chunks(grad_out.contiguous(), 2)
        lsec, deltac = _chunks(lse, 2), _chunks(delta, 2)  # (2, b, hq, c)
        kv = torch.stack([_chunks(k, 2), _chunks(v, 2)])  # travels with its dK/dV accumulator
        dq = torch.zeros(qc.shape, dtype=ct, device=q.device)
        qseg = None if segments is None else _chunks(segments, 1)
        kseg = qseg
        accumulator = None  # the dK/dV of the K/V held, on its way from the previous rank
        for step, pairs in enumerate(plan.steps):
            incoming = ring.start([kv] if kseg is None else [kv, kseg]) if step + 1 < ring.size else None
            # This step's contributions go to a fresh buffer while the accumulator is still in flight.
            part = torch.zeros(kv.shape, dtype=ct, device=q.device)
            for p in pairs:
                bdq, bdk, bdv = ops.backward(
                    doc[p.q_chunk], qc[p.q_chunk], kv[0, p.kv_chunk], kv[1, p.kv_chunk], lsec[p.q_chunk],
                    deltac[p.q_chunk], p.q_start, p.k_start,
                    None if qseg is None else qseg[p.q_chunk], None if kseg is None else kseg[p.kv_chunk])
                dq[p.q_chunk] += bdq
                part[0, p.kv_chunk] += bdk
                part[1, p.kv_chunk] += bdv
            if accumulator is not None:
                part += accumulator.wait()[0]
            # N hops in all bring each accumulator back to its owner.
            accumulator = ring.start([part], tag=2) if ring.size > 1 else None
            if incoming is not None:
                kv, *rest = incoming.wait()
                kseg = rest[0] if rest else None
        dkv = part if accumulator is None else accumulator.wait()[0]  # this rank's own, back from its last hop
        dq = torch.cat(dq.unbind(0), dim=2).to(q.dtype)
        dk = torch.cat(dkv[0].unbind(0), dim=2).to(k.dtype)
        dv = torch.cat(dkv[1].unbind(0), dim=2).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group, window: Optional[int], segments: Optional[Tensor],
                   backend: str, scale: Optional[float] = None) -> Tensor:
    """Causal attention of this CP rank's queries over the whole sequence; all CP ranks call it together.

    q (b, hq, L, d), k/v (b, hkv, L, d) with hq % hkv == 0: this rank's two chunks (``shard_sequence``),
    L = seq_len / cp_size. ``segments`` (b, L) document ids of the same tokens (``segment_ids``, then
    sharded) or None. ``group``: the CP process group, ranks ordered by CP rank; None for no CP.
    ``window``: local attention window in tokens, None for none. ``backend``: the model's attention
    backend, checked; every backend runs the same block kernels (``_block_ops``).
    ``scale`` defaults to 1/sqrt(d). No dropout. Returns (b, hq, L, d) in q's dtype: the local rows of
    full-sequence attention.
    """
    if q.shape[2] % 2 != 0:
        raise ValueError(f"ring_attention: local sequence length {q.shape[2]} must be even (two chunks per CP rank)")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"ring_attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, segments, group, window, scale, backend)
