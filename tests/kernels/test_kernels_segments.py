"""Document masking in the attention kernel: with segment ids, query i sees key j only within its document.

The Triton kernels (interpreter, 16-wide tiles so documents end inside masked and unmasked tile
ranges alike) against PyTorch's sdpa given the same boolean mask, forward and gradients.
"""

import pytest
import torch
import torch.nn.functional as F

import pretrain_kernels as pk
from pretrain_kernels import triton_attention

from kernel_checks import TOL, rel_err


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setitem(triton_attention.INTERPRETER_CONFIGS, "fwd", dict(BLOCK_M=32, BLOCK_N=16))
    monkeypatch.setitem(triton_attention.INTERPRETER_CONFIGS, "dkdv", dict(BLOCK_M=16, BLOCK_N=32))
    monkeypatch.setitem(triton_attention.INTERPRETER_CONFIGS, "dq", dict(BLOCK_M=32, BLOCK_N=16))


def _segments(b: int, s: int, seed: int) -> torch.Tensor:
    """[b, s] int32 document ids: rows cut at random places (one row a single document)."""
    g = torch.Generator().manual_seed(seed)
    ends = torch.rand(b, s, generator=g) < 0.06
    ends[0] = False
    return torch.cumsum(ends, dim=1).to(torch.int32)


def _sdpa(q, k, v, window, segments):
    s = q.shape[2]
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=k.shape[1] != q.shape[1])


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,window", [((2, 2, 1, 83, 32), None), ((2, 2, 2, 70, 64), 24)])
def test_triton_with_segments_matches_sdpa_with_the_same_mask(use_backend, small_tiles, shape, window, dtype):
    b, hq, hkv, s, d = shape
    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(b, h, s, d, generator=g) for h in (hq, hkv, hkv, hq))
    segments = _segments(b, s, seed=2)
    expected = _grads(lambda q, k, v: _sdpa(q, k, v, window, segments.long()), *(t.double() for t in (q, k, v, do)))
    use_backend("triton")
    got = _grads(lambda q, k, v: pk.causal_attention(q, k, v, window=window, segments=segments),
                 *(t.to(dtype) for t in (q, k, v, do)))
    errors = {name: rel_err(a, e) for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected)}
    assert max(errors.values()) < TOL[dtype], errors
    # Without the segments the kernel computes something else: the mask is really applied.
    plain = pk.causal_attention(q.to(dtype), k.to(dtype), v.to(dtype), window=window)
    assert rel_err(plain, expected[0]) > 10 * TOL[dtype]


def test_segments_are_checked():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="segments must be a"):
        pk.causal_attention(q, q, q, segments=torch.zeros(1, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32/int64"):
        pk.causal_attention(q, q, q, segments=torch.zeros(1, 8))


def test_triton_attention_weights_across_documents_are_exactly_zero(use_backend):
    """The model's attention call (pretrain.model.attention) on the Triton backend, with v the identity
    so it returns its weights: exactly zero across an end-of-text token (sdpa and eager: tests/test_document_mask.py)."""
    from pretrain.model import attention

    use_backend("triton")
    tokens = torch.randint(1, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    tokens[0, 9] = tokens[0, 25] = tokens[1, 30] = 0
    seg = attention.segment_ids(tokens, 0)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 2, 40, 32, generator=g), torch.randn(2, 2, 40, 32, generator=g)
    v = torch.eye(40)[:, :32].expand(2, 2, 40, 32).contiguous()  # keys 0..31 (head dims are 16..128)
    weights = attention.attention(q, k, v, None, 0.0, "triton", seg)  # (b, heads, query, key < 32)
    same_doc = (seg[:, None, :, None] == seg[:, None, None, :32]).expand_as(weights)
    causal = torch.ones(40, 32, dtype=torch.bool).tril().expand_as(weights)
    assert torch.all(weights[~same_doc] == 0.0)
    assert torch.all(weights[same_doc & causal] > 0.0)
