"""Fused RMSNorm: Triton (interpreter) and reference against float64."""

import pytest
import torch

import pretrain_kernels as pk
from kernel_checks import TOL, rel_err


def _run(x, w, dy, eps):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = pk.rms_norm(x, w, eps)
    y.backward(dy)
    return y, x.grad, w.grad


# shapes: a ragged hidden size (not a power of two), short rows packed per program, a long row
@pytest.mark.parametrize("shape", [(2, 37, 64), (3, 5, 96), (4, 1000), (2, 3, 4096)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_matches_float64(use_backend, backend, shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    use_backend("reference")
    expected = _run(x.double(), w.double(), dy.double(), 1e-5)
    use_backend(backend)
    got = _run(x, w, dy, 1e-5)
    for name, a, e in zip(("y", "dx", "dw"), got, expected):
        assert a.dtype == dtype and a.shape == e.shape, name
        # dw sums over every row: compare it at the output tolerance of its dtype as well
        assert rel_err(a, e) < TOL[dtype], (name, rel_err(a, e))


def test_float32_weight_with_bf16_input(use_backend):
    use_backend("triton")
    x = torch.randn(6, 64).bfloat16()
    w = torch.rand(64, requires_grad=True)
    y = pk.rms_norm(x, w, 1e-6)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    expected = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)) * w.double()
    assert rel_err(y, expected) < TOL[torch.bfloat16]


def test_matches_torch_rms_norm():
    x, w = torch.randn(4, 10, 128), torch.rand(128)
    expected = torch.nn.functional.rms_norm(x, (128,), w, eps=1e-5)
    assert rel_err(pk.rms_norm(x, w, 1e-5), expected) < 1e-6


def test_non_contiguous_input(use_backend):
    use_backend("triton")
    x = torch.randn(64, 8).t()  # (8, 64) with row stride 1: copied internally
    w = torch.rand(64)
    expected = torch.nn.functional.rms_norm(x, (64,), w, eps=1e-5)
    y = pk.rms_norm(x, w, 1e-5)
    assert y.is_contiguous() and rel_err(y, expected) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradcheck_float64(use_backend, backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: pk.rms_norm(x, w, 1e-3), (x, w), fast_mode=backend == "triton")


@pytest.mark.parametrize(
    "x,w,eps,match",
    [
        (torch.randn(4, 8), torch.ones(7), 1e-5, "shape"),
        (torch.randn(4, 8), torch.ones(4, 8), 1e-5, "shape"),
        (torch.randn(4, 8).half(), torch.ones(8).bfloat16(), 1e-5, "dtype"),
        (torch.randn(4, 8), torch.ones(8).double(), 1e-5, "dtype"),
        (torch.randint(0, 4, (4, 8)), torch.ones(8), 1e-5, "floating"),
        (torch.randn(4, 8), torch.ones(8), -1.0, "eps"),
        (torch.randn(4, 8), torch.ones(16)[::2], 1e-5, "contiguous"),
    ],
)
def test_bad_input_raises(x, w, eps, match):
    with pytest.raises(ValueError, match=match):
        pk.rms_norm(x, w, eps)
