"""Fused rotary embedding on q and k: Triton (interpreter) and reference against float64."""

import pytest
import torch

import pretrain_kernels as pk
from kernel_checks import TOL, rel_err
from pretrain_kernels import reference


def _tables(s, d, dtype=torch.float32, base=10000.0):
    """Hugging Face Llama's cos/sin: (S, D), the D/2 frequencies repeated twice."""
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(s, dtype=torch.float64), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _hf_apply_rotary(q, k, cos, sin):
    # transformers.models.llama.modeling_llama.apply_rotary_pos_emb, written out
    return q * cos + reference.rotate_half(q) * sin, k * cos + reference.rotate_half(k) * sin


def _run(q, k, cos, sin, gq, gk):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo, ko = pk.apply_rotary(q, k, cos, sin)
    torch.autograd.backward((qo, ko), (gq, gk))
    return qo, ko, q.grad, k.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 2, 37, 64), (1, 3, 1, 20, 128), (2, 2, 2, 50, 32)], ids=str)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_matches_float64(use_backend, backend, shape, dtype):
    b, hq, hkv, s, d = shape
    g = torch.Generator().manual_seed(0)
    q, gq = (torch.randn(b, hq, s, d, generator=g).to(dtype) for _ in range(2))
    k, gk = (torch.randn(b, hkv, s, d, generator=g).to(dtype) for _ in range(2))
    cos, sin = _tables(s, d)
    expected = _hf_apply_rotary(q.double(), k.double(), cos.double(), sin.double())
    use_backend(backend)
    got = _run(q, k, cos, sin, gq, gk)
    assert rel_err(got[0], expected[0]) < TOL[dtype] and rel_err(got[1], expected[1]) < TOL[dtype]
    # The map is orthogonal per position pair (cos^2 + sin^2 = 1): the gradient is the inverse rotation.
    dq, dk = _hf_apply_rotary(gq.double(), gk.double(), cos.double(), -sin.double())
    assert rel_err(got[2], dq) < TOL[dtype] and rel_err(got[3], dk) < TOL[dtype]
    assert all(t.dtype == dtype for t in got)


def test_tables_in_input_dtype(use_backend):
    use_backend("triton")
    q, k = torch.randn(1, 2, 10, 32).bfloat16(), torch.randn(1, 1, 10, 32).bfloat16()
    cos, sin = _tables(10, 32, torch.bfloat16)
    expected = _hf_apply_rotary(q.double(), k.double(), cos.double(), sin.double())
    qo, ko = pk.apply_rotary(q, k, cos, sin)
    assert rel_err(qo, expected[0]) < TOL[torch.bfloat16] and rel_err(ko, expected[1]) < TOL[torch.bfloat16]


def test_strided_inputs(use_backend):
    use_backend("triton")
    qkv = torch.randn(2, 12, 3, 2, 32)  # (B, S, 3, H, D) as a fused projection lays it out
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    cos, sin = _tables(12, 32)
    expected = _hf_apply_rotary(q, k, cos, sin)
    qo, ko = pk.apply_rotary(q, k, cos, sin)
    assert rel_err(qo, expected[0]) < 1e-6 and rel_err(ko, expected[1]) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradcheck_float64(use_backend, backend):
    """Gradients for q, k and also for the cos/sin tables (when they require grad)."""
    use_backend(backend)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 5, 16, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 1, 5, 16, dtype=torch.float64, generator=g, requires_grad=True)
    cos = torch.randn(5, 16, dtype=torch.float64, generator=g, requires_grad=True)
    sin = torch.randn(5, 16, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(pk.apply_rotary, (q, k, cos, sin), fast_mode=backend == "triton")


@pytest.mark.parametrize(
    "q,k,cos,sin,match",
    [
        (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(8, 16), torch.randn(8, 16), "cos must have shape"),
        (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(8, 32), torch.randn(9, 32), "sin must have shape"),
        (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32).half(), torch.randn(8, 32), torch.randn(8, 32), "share a dtype"),
        (torch.randn(1, 2, 8, 32).bfloat16(), torch.randn(1, 2, 8, 32).bfloat16(), torch.randn(8, 32).half(),
         torch.randn(8, 32).half(), "dtype"),
        (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 7, 32), torch.randn(8, 32), torch.randn(8, 32), "must agree"),
        (torch.randn(1, 2, 8, 24), torch.randn(1, 2, 8, 24), torch.randn(8, 24), torch.randn(8, 24), "head dim 24"),
        (torch.randn(1, 2, 32, 8).transpose(-1, -2), torch.randn(1, 2, 8, 32), torch.randn(8, 32),
         torch.randn(8, 32), "contiguous last"),
        (torch.randn(2, 8, 32), torch.randn(2, 8, 32), torch.randn(8, 32), torch.randn(8, 32), "4-D"),
    ],
)
def test_bad_input_raises(q, k, cos, sin, match):
    with pytest.raises(ValueError, match=match):
        pk.apply_rotary(q, k, cos, sin)
