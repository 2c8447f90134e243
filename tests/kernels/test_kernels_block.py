"""Attention blocks for context parallelism (pretrain_kernels.attention_block_forward/_backward).

A block is queries at absolute positions q_start.. against keys at k_start..; ring attention merges
blocks by logsumexp. The Triton kernels (interpreter) and the reference are checked against float64
for every relation of the two position ranges, and blocks merged ring-style against causal_attention.
"""

import pytest
import torch

import pretrain_kernels as pk
from pretrain_kernels import triton_attention

from kernel_checks import TOL, rel_err

ops = torch.ops.pretrain_kernels

# Interpreter tiles (fwd, dkdv, dq) as (BLOCK_M, BLOCK_N): the defaults (one tile per block here), and
# 16-wide ones, so block offsets fall inside tiles and every loop range and its clamps run.
TILES = {"default": None, "small": ((32, 16), (16, 32), (32, 16))}


def _use_tiles(monkeypatch, name):
    for kind, (m, n) in zip(("fwd", "dkdv", "dq"), TILES[name] or ()):
        monkeypatch.setitem(triton_attention.INTERPRETER_CONFIGS, kind, dict(BLOCK_M=m, BLOCK_N=n))


@pytest.fixture(params=list(TILES))
def tiles(request, monkeypatch):
    _use_tiles(monkeypatch, request.param)
    return request.param


def _segments(b: int, s: int, seed: int) -> torch.Tensor:
    """[b, s] int32 document ids of whole sequences; blocks slice them (documents cross block edges)."""
    ends = torch.rand(b, s, generator=torch.Generator().manual_seed(seed)) < 0.05
    return torch.cumsum(ends, dim=1).to(torch.int32)


# name: (B, Hq, Hkv, Sq, Sk, q_start, k_start, window, segments)
CASES = {
    "visible": (1, 2, 2, 40, 24, 64, 0, None, False),  # keys all before the queries
    "diagonal": (1, 2, 1, 37, 37, 48, 48, None, False),  # same start: causal inside the block
    "partial": (2, 2, 2, 48, 40, 20, 35, None, False),  # keys start after the first queries
    "overlap_gqa": (1, 4, 2, 33, 45, 37, 10, None, False),  # starts off the tile grid
    "window": (1, 2, 1, 40, 40, 64, 30, 20, False),  # the last rows see no key of this block
    "segments": (2, 2, 1, 40, 50, 30, 0, None, True),
    "window_segments_gqa": (2, 4, 1, 30, 45, 50, 20, 17, True),
}


def _inputs(case, dtype, seed=0):
    b, hq, hkv, sq, sk, q_start, k_start, window, segmented = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(b, hq, sq, 32, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, sk, 32, generator=g).to(dtype) for _ in range(2))
    kw = dict(q_start=q_start, k_start=k_start, window=window)
    if segmented:
        seg = _segments(b, max(q_start + sq, k_start + sk), seed + 1)
        kw.update(q_segments=seg[:, q_start:q_start + sq], k_segments=seg[:, k_start:k_start + sk])
    return (q, k, v, do), kw


def _block(q, k, v, do, lse, delta, kw):
    out, own_lse = pk.attention_block_forward(q, k, v, **kw)
    return (out, own_lse) + pk.attention_block_backward(do, q, k, v, lse, delta, **kw)


def _check_against_float64(use_backend, backend, case, dtype):
    (q, k, v, do), kw = _inputs(case, dtype)
    use_backend("reference")
    out64, lse64 = pk.attention_block_forward(*(t.double() for t in (q, k, v)), **kw)
    # The backward gets the statistics of the (here: single-block) merged output, as in ring attention.
    delta64 = (do.double() * out64).sum(-1)
    expected = _block(*(t.double() for t in (q, k, v, do)), lse64, delta64, kw)
    use_backend(backend)
    got = _block(q, k, v, do, lse64.float(), delta64.float(), kw)
    out, lse = got[:2]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert all(not torch.isnan(t).any() for t in got)
    blind = torch.isinf(lse64)  # rows that see no key of this block
    assert torch.equal(torch.isinf(lse), blind) and torch.all(lse[blind] < 0)
    assert torch.all(out[blind] == 0)
    for name, a, e in zip(("dq", "dk", "dv"), got[2:], expected[2:]):
        assert a.dtype == dtype and a.shape == e.shape, name
    errors = {name: rel_err(a, e) for name, a, e in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:],
                                                        expected[:1] + expected[2:])}
    errors["lse"] = rel_err(lse[~blind], lse64[~blind])  # the -inf rows are checked above
    assert max(errors.values()) < TOL[dtype], errors
    return blind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_block_matches_float64(use_backend, tiles, case, dtype):
    blind = _check_against_float64(use_backend, "triton", case, dtype)
    if case == "window":
        assert blind.any() and not blind.all()  # the case really has rows with nothing to see


@pytest.mark.parametrize("case", ["partial", "window_segments_gqa"])
def test_triton_block_float16(use_backend, case):
    _check_against_float64(use_backend, "triton", case, torch.float16)


def test_triton_block_float64_matches_reference(use_backend):
    """float64 runs the Triton kernels only when forced (auto sends it to the reference): fp64 accumulation."""
    (q, k, v, do), kw = _inputs("window_segments_gqa", torch.float64)
    use_backend("reference")
    out, lse = pk.attention_block_forward(q, k, v, **kw)
    delta = (do * out).sum(-1)
    expected = _block(q, k, v, do, lse, delta, kw)
    use_backend("triton")
    got = _block(q, k, v, do, lse, delta, kw)
    assert got[1].dtype == torch.float64 and torch.equal(torch.isinf(got[1]), torch.isinf(lse))
    for a, e in zip(got[:1] + got[2:], expected[:1] + expected[2:]):
        assert rel_err(a, e) < 1e-12


@pytest.mark.parametrize("case", ["visible", "partial", "window_segments_gqa"])
def test_reference_block_float32_matches_float64(use_backend, case):
    _check_against_float64(use_backend, "reference", case, torch.float32)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fully_masked_block_is_exactly_zero(use_backend, backend):
    """Keys all after the queries: out 0, lse -inf, and no gradient whatever the merged statistics."""
    use_backend(backend)
    g = torch.Generator().manual_seed(0)
    q, do = torch.randn(2, 2, 30, 32, generator=g), torch.randn(2, 2, 30, 32, generator=g)
    k, v = torch.randn(2, 1, 20, 32, generator=g), torch.randn(2, 1, 20, 32, generator=g)
    kw = dict(q_start=0, k_start=30)  # query 29 and key 30: the nearest pair is still masked
    out, lse = pk.attention_block_forward(q, k, v, **kw)
    assert torch.equal(out, torch.zeros_like(q)) and torch.all(lse == float("-inf"))
    for merged_lse, delta in ((lse, torch.zeros_like(lse)), (torch.randn(2, 2, 30, generator=g),) * 2):
        for grad, t in zip(pk.attention_block_backward(do, q, k, v, merged_lse, delta, **kw), (q, k, v)):
            assert torch.equal(grad, torch.zeros_like(t))


def test_block_at_the_origin_is_causal_attention(use_backend):
    use_backend("triton")
    (q, k, v, _), _ = _inputs("diagonal", torch.float32)
    out, _ = pk.attention_block_forward(q, k, v, q_start=0, k_start=0, window=5)
    assert torch.equal(out, pk.causal_attention(q, k, v, window=5))


def _ring(q, k, v, do, n_blocks, window, segments, dtype):
    """Full causal attention as n_blocks x n_blocks blocks (masked ones included), merged by logsumexp,
    then each block's backward with the merged lse and delta. Returns out, dq, dk, dv."""
    n = q.shape[2] // n_blocks
    cut = [slice(i * n, (i + 1) * n) for i in range(n_blocks)]

    def kw(i, j):
        seg = {} if segments is None else dict(q_segments=segments[:, cut[i]], k_segments=segments[:, cut[j]])
        return dict(q_start=i * n, k_start=j * n, window=window, **seg)

    outs, lses = [], []
    for i in range(n_blocks):
        parts = [pk.attention_block_forward(q[:, :, cut[i]], k[:, :, cut[j]], v[:, :, cut[j]], **kw(i, j))
                 for j in range(n_blocks)]
        lse = torch.logsumexp(torch.stack([part_lse for _, part_lse in parts]), dim=0)
        outs.append(sum(o.float() * torch.exp(part_lse - lse)[..., None] for o, part_lse in parts).to(dtype))
        lses.append(lse)
    out = torch.cat(outs, dim=2)
    dq, dk, dv = (torch.zeros(t.shape) for t in (q, k, v))  # fp32 sums of the blocks' parts
    for i in range(n_blocks):
        delta = (do[:, :, cut[i]].float() * outs[i].float()).sum(-1)
        for j in range(n_blocks):
            grads = pk.attention_block_backward(do[:, :, cut[i]], q[:, :, cut[i]], k[:, :, cut[j]], v[:, :, cut[j]],
                                                lses[i], delta, **kw(i, j))
            for total, part, rows in zip((dq, dk, dv), grads, (cut[i], cut[j], cut[j])):
                total[:, :, rows] += part.float()
    return out, dq, dk, dv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_blocks", [2, 4])
@pytest.mark.parametrize("window,segmented", [(None, False), (11, True)], ids=["causal", "window_segments"])
def test_merged_blocks_reproduce_causal_attention(use_backend, monkeypatch, n_blocks, window, segmented, dtype):
    use_backend("triton")
    _use_tiles(monkeypatch, "small")
    g = torch.Generator().manual_seed(3)
    q, do = (torch.randn(1, 2, 64, 32, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(1, 1, 64, 32, generator=g).to(dtype) for _ in range(2))
    segments = _segments(1, 64, seed=4) if segmented else None
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    full = pk.causal_attention(*leaves, window=window, segments=segments)
    full.backward(do)
    got = _ring(q, k, v, do, n_blocks, window, segments, dtype)
    expected = (full, *(t.grad for t in leaves))
    errors = {name: rel_err(a, e) for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected)}
    assert max(errors.values()) < TOL[dtype], errors


def _opcheck_args():
    g = torch.Generator().manual_seed(0)
    q, do = torch.randn(2, 4, 12, 16, generator=g), torch.randn(2, 4, 12, 16, generator=g)
    k, v = torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)
    seg = _segments(2, 30, seed=1)
    q_seg, k_seg = seg[:, 15:27].contiguous(), seg[:, 8:17].contiguous()
    out, lse = ops.attention_block_fwd(q, k, v, 15, 8, 6, 0.3, q_seg, k_seg)
    delta = (do * out).sum(-1)
    return {
        "fwd": (ops.attention_block_fwd.default, (q, k, v, 15, 8, 6, 0.3, q_seg, k_seg)),
        "fwd_plain": (ops.attention_block_fwd.default, (q, k, v, 15, 8, 0, 0.3)),
        "bwd": (ops.attention_block_bwd.default, (do, q, k, v, lse, delta, 15, 8, 6, 0.3, q_seg, k_seg)),
    }


@pytest.mark.parametrize("case", list(_opcheck_args()))
def test_block_opcheck_on_both_backends(use_backend, case):
    op, args = _opcheck_args()[case]
    for backend in ("reference", "triton"):  # one op, whichever implementation runs
        use_backend(backend)
        torch.library.opcheck(op, args)


def _bad_calls():
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 1, 9, 16)
    lse = torch.zeros(1, 2, 8)
    fwd = pk.attention_block_forward
    seg8, seg9 = torch.zeros(1, 8, dtype=torch.int32), torch.zeros(1, 9, dtype=torch.int32)
    return [
        (lambda: fwd(q, torch.randn(2, 1, 9, 16), torch.randn(2, 1, 9, 16), q_start=0, k_start=0),
         "attention_block_forward: .* must agree on batch and head dim"),
        (lambda: fwd(q, k, k, q_start=-1, k_start=0), "q_start must be an int"),
        (lambda: fwd(q, k, k, q_start=0, k_start=True), "k_start must be an int"),
        (lambda: fwd(q, k, k, q_start=0, k_start=2.0), "k_start must be an int"),
        (lambda: fwd(q, k, k, q_start=0, k_start=0, window=0), "window must be None or a positive int"),
        (lambda: fwd(q, k, k, q_start=0, k_start=0, q_segments=seg8), "both q_segments and k_segments"),
        (lambda: fwd(q, k, k, q_start=0, k_start=0, q_segments=seg8, k_segments=seg8),
         r"k_segments must be a \[B, S\] = \[1, 9\]"),
        (lambda: pk.attention_block_backward(q, q, k, k, lse[..., :7], lse, q_start=0, k_start=0), "lse must be"),
        (lambda: pk.attention_block_backward(q, q, k, k, lse, lse.long(), q_start=0, k_start=0), "delta must be"),
        (lambda: pk.attention_block_backward(q.double(), q, k, k, lse, lse, q_start=0, k_start=0,
                                             q_segments=seg8, k_segments=seg9), "grad_out must match q"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_block_input_raises(index):
    call, match = _bad_calls()[index]
    with pytest.raises(ValueError, match=match):
        call()
