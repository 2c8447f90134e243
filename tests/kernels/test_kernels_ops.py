"""Custom-op plumbing: opcheck, torch.compile, backend selection, and the benchmark script on CPU."""

import pytest
import torch

import pretrain_kernels as pk
from kernel_checks import rel_err
from pretrain_kernels import _backend

ops = torch.ops.pretrain_kernels


def _attention_args(dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 20, 32, generator=g, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(2, 2, 20, 32, generator=g, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(2, 2, 20, 32, generator=g, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def _opcheck_cases():
    q, k, v = _attention_args()
    out, lse = ops.attention_fwd(q, k, v, 6, 0.2)
    x, w = torch.randn(3, 7, 48, requires_grad=True), torch.rand(48, requires_grad=True)
    y, rstd = ops.rms_norm_fwd(x, w, 1e-5)
    cos, sin = torch.randn(20, 32), torch.randn(20, 32)
    return {
        "attention_fwd": (ops.attention_fwd.default, (q, k, v, 6, 0.2)),
        "attention_fwd_nowindow": (ops.attention_fwd.default, (q, k, v, 0, 0.2)),
        "attention_bwd": (ops.attention_bwd.default,
                          tuple(t.detach() for t in (torch.randn_like(out), q, k, v, out, lse)) + (6, 0.2)),
        "rms_norm_fwd": (ops.rms_norm_fwd.default, (x, w, 1e-5)),
        "rms_norm_bwd": (ops.rms_norm_bwd.default, tuple(t.detach() for t in (torch.randn_like(y), x, w, rstd))),
        "rotary": (ops.rotary.default, (q, k, cos, sin, False)),
        "rotary_transposed": (ops.rotary.default, (q, k, cos, sin, True)),
    }


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(use_backend, backend, case):
    use_backend(backend)
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def _model_step(x, w, q, k, v, cos, sin):
    h = pk.rms_norm(x, w, 1e-5)
    q, k = pk.apply_rotary(q, k, cos, sin)
    return pk.causal_attention(q, k, v, window=5).square().sum() + h.square().sum()


def test_torch_compile_fullgraph(use_backend):
    """One compiled graph (forward and backward) serves both backends: the choice is made inside the ops."""
    torch._dynamo.reset()
    q, k, v = _attention_args()
    x, w = torch.randn(2, 20, 64, requires_grad=True), torch.rand(64, requires_grad=True)
    cos, sin = torch.randn(20, 32), torch.randn(20, 32)
    inputs = (x, w, q, k, v)
    use_backend("reference")
    eager = _model_step(x, w, q, k, v, cos, sin)
    eager_grads = torch.autograd.grad(eager, inputs)
    step = torch.compile(_model_step, fullgraph=True)
    for backend in ("reference", "triton"):
        use_backend(backend)
        compiled = step(x, w, q, k, v, cos, sin)
        compiled_grads = torch.autograd.grad(compiled, inputs)
        assert rel_err(compiled, eager) < 1e-6, backend
        for a, e in zip(compiled_grads, eager_grads):
            assert rel_err(a, e) < 1e-5, backend


def test_backend_selection(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    _backend._backend = None
    assert pk.get_backend() == "auto" and not _backend.use_triton(cpu)
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    assert pk.get_backend() == "triton" and _backend.use_triton(cpu)  # TRITON_INTERPRET=1 in these tests
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert not _backend.use_triton(cpu)
    pk.set_backend("triton")  # an explicit setting wins over the environment
    assert pk.get_backend() == "triton"
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    _backend._backend = None
    with pytest.raises(ValueError, match="PRETRAIN_KERNELS_BACKEND"):
        pk.get_backend()
    with pytest.raises(ValueError, match="unknown kernel backend"):
        pk.set_backend("fast")


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: forcing Triton is valid")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        pk.set_backend("triton")
    _backend._backend = "triton"  # e.g. set while the interpreter was on, then switched off
    q, k, v = _attention_args(requires_grad=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        pk.causal_attention(q, k, v)


def test_backends_agree(use_backend):
    """Forward and backward on one backend can be swapped for the other (same saved statistics)."""
    q, k, v = _attention_args()
    results = {}
    for backend in ("reference", "triton"):
        use_backend(backend)
        out = pk.causal_attention(q, k, v, window=7)
        results[backend] = (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, e in zip(results["triton"], results["reference"]):
        assert rel_err(a, e) < 1e-5


def test_bench_exits_cleanly_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    from pretrain_kernels import bench

    assert bench.main([]) == 0  # `python -m pretrain_kernels.bench` exits with this status
    assert "no CUDA GPU" in capsys.readouterr().out


def test_bench_smoke_run_under_interpreter(capsys):
    """The benchmark's own code paths, on tiny CPU shapes under the interpreter (timings meaningless)."""
    from pretrain_kernels import bench

    assert bench.main(["--device", "cpu", "--seq-lens", "40", "--head-dims", "32", "--hidden", "64",
                       "--tokens", "40", "--kv-heads", "1", "--window", "8"]) == 0
    out = capsys.readouterr().out
    assert "triton" in out and "sdpa" in out and "rms_norm" in out and "rotary" in out
