"""Causal attention: the Triton kernels (interpreter) and the reference path against float64."""

import pytest
import torch

import pretrain_kernels as pk
from pretrain_kernels import reference, triton_attention

from kernel_checks import TOL, rel_err


def _inputs(b, hq, hkv, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(b, h, s, d, generator=g) for h in (hq, hkv, hkv, hq))
    return [t.to(dtype) for t in (q, k, v, do)]


def _run(q, k, v, do, window):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = pk.causal_attention(q, k, v, window=window)
    out.backward(do)
    return out, q.grad, k.grad, v.grad


def _check_against_float64(use_backend, backend, shape, window, dtype, seed=0):
    q, k, v, do = _inputs(*shape, dtype, seed=seed)
    use_backend("reference")
    expected = _run(*(t.double() for t in (q, k, v, do)), window)
    use_backend(backend)
    got = _run(q, k, v, do, window)
    errors = {name: rel_err(a, e) for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected)}
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert a.dtype == dtype and a.shape == e.shape, name
    assert max(errors.values()) < TOL[dtype], errors
    return errors


# (B, Hq, Hkv, S, D), window: covers head dims 32/64/128, KV ratios 1, 2 and MQA, ragged lengths
# (not multiples of any tile), window on and off, batch > 1.
CASES = [
    ((2, 2, 2, 100, 32), None),
    ((2, 2, 1, 77, 64), 16),
    ((1, 3, 1, 61, 128), None),
    ((2, 2, 1, 100, 64), 9),
    ((1, 4, 2, 45, 128), 20),
    ((2, 1, 1, 33, 32), 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,window", CASES, ids=[f"{s}-w{w}" for s, w in CASES])
def test_triton_matches_float64(use_backend, shape, window, dtype):
    _check_against_float64(use_backend, "triton", shape, window, dtype)


@pytest.mark.parametrize("shape,window", [((2, 4, 1, 70, 64), 13), ((1, 2, 2, 50, 128), None)])
def test_triton_float16(use_backend, shape, window):
    _check_against_float64(use_backend, "triton", shape, window, torch.float16)


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles: several blocks per sequence, so every loop range (window edge, unmasked middle,
    diagonal) and the ragged last block all run."""
    for kind, cfg in triton_attention.INTERPRETER_CONFIGS.items():
        monkeypatch.setitem(triton_attention.INTERPRETER_CONFIGS, kind, dict(cfg, BLOCK_M=16, BLOCK_N=16))
    monkeypatch.setitem(triton_attention.INTERPRETER_CONFIGS, "fwd", dict(BLOCK_M=32, BLOCK_N=16))
    monkeypatch.setitem(triton_attention.INTERPRETER_CONFIGS, "dkdv", dict(BLOCK_M=16, BLOCK_N=32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,window", [((1, 2, 1, 90, 32), None), ((1, 2, 2, 83, 64), 21),
                                          ((2, 1, 1, 64, 32), 3), ((1, 2, 1, 64, 32), 48)])
def test_triton_many_tiles(use_backend, small_tiles, shape, window, dtype):
    _check_against_float64(use_backend, "triton", shape, window, dtype)


@pytest.mark.parametrize("shape,window", CASES[:4])
def test_reference_float32_matches_float64(use_backend, shape, window):
    _check_against_float64(use_backend, "reference", shape, window, torch.float32)


def test_reference_matches_explicit_softmax():
    """The reference itself against textbook masked softmax with K/V repeated per query head."""
    q, k, v, _ = _inputs(2, 4, 2, 20, 32, torch.float64)
    for window in (None, 5):
        out, _ = reference.attention_forward(q, k, v, window or 0, 0.3)
        kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        i, j = torch.arange(20)[:, None], torch.arange(20)[None, :]
        allowed = (j <= i) & ((i - j < window) if window else True)
        scores = (q @ kr.transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf"))
        expected = torch.softmax(scores, -1) @ vr
        assert rel_err(out, expected) < 1e-12


def test_matches_sdpa_without_window():
    q, k, v, _ = _inputs(2, 4, 4, 40, 64, torch.float32)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(pk.causal_attention(q, k, v), expected) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,window", [((2, 4, 2, 512, 64), None), ((1, 2, 1, 700, 128), 256),
                                          ((1, 2, 2, 1000, 32), 100)])
def test_triton_long_sequences(use_backend, shape, window, dtype):
    _check_against_float64(use_backend, "triton", shape, window, dtype)


def test_strided_inputs(use_backend):
    """q/k/v as views of a fused [B, S, 3, H, D] projection: no copy needed, same result."""
    use_backend("triton")
    b, s, h, d = 2, 50, 2, 32
    qkv = torch.randn(b, s, 3, h, d)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D), non-contiguous
    assert not q.is_contiguous()
    expected = reference.attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), 0, d ** -0.5)[0]
    assert rel_err(pk.causal_attention(q, k, v), expected) < 1e-5


@pytest.mark.parametrize("backend,fast", [("reference", False), ("reference", True), ("triton", True)])
def test_gradcheck_float64(use_backend, backend, fast):
    use_backend(backend)
    g = torch.Generator().manual_seed(0)
    s = 4 if not fast else 9  # the full (slow-mode) Jacobian only on a tiny problem
    q = torch.randn(1, 2, s, 16, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 1, s, 16, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 1, s, 16, dtype=torch.float64, generator=g, requires_grad=True)
    for window in (None, 3) if fast else (3,):
        assert torch.autograd.gradcheck(lambda q, k, v: pk.causal_attention(q, k, v, window=window),
                                        (q, k, v), fast_mode=fast)


def test_gqa_gradients_have_kv_shape(use_backend):
    use_backend("triton")
    q, k, v, do = _inputs(1, 4, 1, 20, 32, torch.float32)
    out, dq, dk, dv = _run(q, k, v, do, None)
    assert out.shape == q.shape and dq.shape == q.shape
    assert dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_window_one_attends_to_itself(use_backend, backend):
    """w = 1: out = v, dv = dO, and dq = dk = 0 up to rounding (the softmax has a single entry)."""
    use_backend(backend)
    q, k, v, do = _inputs(2, 2, 1, 33, 32, torch.float32)
    out, dq, dk, dv = _run(q, k, v, do, 1)
    assert torch.equal(out, v.expand_as(out))
    assert rel_err(dv, do.sum(1, keepdim=True)) < 1e-6
    scale = do.norm() * v.norm() / do.numel() ** 0.5
    assert dq.norm() < 1e-6 * scale and dk.norm() < 1e-6 * scale


def test_window_larger_than_sequence_is_full_causal(use_backend):
    use_backend("triton")
    q, k, v, _ = _inputs(1, 2, 2, 30, 32, torch.float32)
    assert torch.equal(pk.causal_attention(q, k, v, window=30), pk.causal_attention(q, k, v))
    assert torch.equal(pk.causal_attention(q, k, v, window=1000), pk.causal_attention(q, k, v))


def test_flop_count():
    # Full causal: S(S+1)/2 visible pairs, 4 FLOPs per pair per head-dim element.
    assert triton_attention.flops(1, 1, 4, 8)["fwd"] == 4 * 10 * 8
    # Window 2 on 4 tokens: rows see 1, 2, 2, 2 keys.
    assert triton_attention.flops(1, 1, 4, 8, window=2)["fwd"] == 4 * 7 * 8


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(1, 3, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)), "multiple of KV heads"),
        (lambda: (torch.randn(1, 2, 8, 48), torch.randn(1, 2, 8, 48), torch.randn(1, 2, 8, 48)), "head dim 48"),
        (lambda: (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32).half(), torch.randn(1, 2, 8, 32)), "share a dtype"),
        (lambda: (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)), "must agree"),
        (lambda: (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 1, 8, 32)), "k and v shapes"),
        (lambda: (torch.randn(1, 2, 32, 8).transpose(-1, -2), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)),
         "contiguous last"),
        (lambda: (torch.randn(2, 8, 32), torch.randn(2, 8, 32), torch.randn(2, 8, 32)), "4-D"),
        (lambda: (torch.randint(0, 3, (1, 2, 8, 32)),) * 3, "unsupported dtype"),
    ],
)
def test_bad_input_raises(make, match):
    with pytest.raises(ValueError, match=match):
        pk.causal_attention(*make())


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_bad_window_raises(window):
    q = torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="window"):
        pk.causal_attention(q, q, q, window=window)
