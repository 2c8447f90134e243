"""Ring attention (context parallelism) against unsharded attention.

Multi-process cases run on gloo in tests/ring_worker.py; each launch runs every case once and the
tests here compare its outputs and gradients, unsharded back to full order, with
``attention(..., backend="eager")`` and its autograd gradients (float32 within 1e-6; bfloat16 within
2e-2), and in float64 with backend "sdpa" within 1e-12 (exact up to rounding).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import REPO, child_env
from pretrain.model.attention import attention
from pretrain.model.ring_attention import (
    chunk_positions, ring_attention, ring_plan, shard_sequence, unshard_sequence,
)

SEQ, HEAD_DIM, WINDOW = 32, 16, 6
# Document lengths per batch row; boundaries fall inside chunks for cp2 (c = 8) and cp4 (c = 4).
DOCUMENTS = [[3, 10, 6, 13], [7, 2, 14, 9]]


def _segments(lengths_per_row) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(r), dtype=torch.int32), torch.tensor(r))
                        for r in lengths_per_row])


CASES = {  # name: (query heads, KV heads, window, documents, dtype, backend)
    "causal": (2, 2, None, False, torch.float32, "eager"),
    "gqa": (4, 2, None, False, torch.float32, "sdpa"),
    "window": (2, 2, WINDOW, False, torch.float32, "eager"),
    "documents": (2, 2, None, True, torch.float32, "eager"),
    "gqa_window_documents": (4, 2, WINDOW, True, torch.float32, "eager"),
    "bf16_gqa_window_documents": (4, 2, WINDOW, True, torch.bfloat16, "eager"),
    # float32 agrees to its rounding noise only; float64 shows the ring is exact (~1e-15).
    "fp64_gqa_window_documents": (4, 2, WINDOW, True, torch.float64, "eager"),
}
TRITON_CASES = {"triton_gqa_window_documents": (4, 2, WINDOW, True, torch.float32, "triton")}


def _inputs(spec, seed: int) -> dict:
    hq, hkv, window, documents, dtype, backend = spec
    g = torch.Generator().manual_seed(seed)
    shape = lambda h: (2, h, SEQ, HEAD_DIM)  # noqa: E731  (b, heads, s, d)
    q, grad_out = torch.randn(shape(hq), generator=g), torch.randn(shape(hq), generator=g)
    k, v = torch.randn(shape(hkv), generator=g), torch.randn(shape(hkv), generator=g)
    return {"q": q.to(dtype), "k": k.to(dtype), "v": v.to(dtype), "grad_out": grad_out.to(dtype),
            "segments": _segments(DOCUMENTS) if documents else None, "window": window, "backend": backend}


def _expected(case: dict) -> dict:
    """Unsharded attention and its autograd gradients: eager in float32 (for float32 and bfloat16
    inputs), sdpa in float64 (eager's softmax runs in float32 whatever the input dtype)."""
    dtype = torch.float64 if case["q"].dtype == torch.float64 else torch.float32
    q, k, v = (case[n].to(dtype).requires_grad_() for n in ("q", "k", "v"))
    backend = "sdpa" if dtype == torch.float64 else "eager"
    out = attention(q, k, v, case["window"], 0.0, backend, case["segments"])
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), case["grad_out"].to(dtype))
    return {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}


def _launch(tmp: Path, world: int, groups: list, cases: dict, env: dict | None = None) -> dict:
    """Run ``cases`` on every CP group; {case: (inputs, [results of each group])}."""
    tmp.mkdir(parents=True, exist_ok=True)
    inputs = {name: _inputs(spec, seed) for seed, (name, spec) in enumerate(cases.items())}
    torch.save(inputs, tmp / "inputs.pt")
    cmd = [sys.executable, str(REPO / "tests" / "ring_worker.py"), str(world), json.dumps(groups),
           str(tmp / "inputs.pt"), str(tmp)]
    proc = subprocess.run(cmd, env={**child_env(), **(env or {})}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {name: (inputs[name], [torch.load(tmp / f"{name}.g{i}.pt") for i in range(len(groups))])
            for name in cases}


@pytest.fixture(scope="module")
def cp2(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("cp2"), 2, [[0, 1]], CASES)


@pytest.fixture(scope="module")
def cp4(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("cp4"), 4, [[0, 1, 2, 3]], CASES)


def _check(inputs: dict, result: dict, dtype: torch.dtype) -> None:
    expected = _expected(inputs)
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    for name in ("out", "dq", "dk", "dv"):
        assert result[name].dtype == dtype
        torch.testing.assert_close(result[name].to(expected[name].dtype), expected[name], atol=tol, rtol=tol,
                                   msg=lambda m: f"{name}: {m}")


def _check_calls(inputs: dict, result: dict) -> None:
    """Each CP rank called the block kernels once per planned pair, forward and backward."""
    for (fwd, bwd), (computed, skipped) in zip(result["calls"], result["plans"]):
        assert fwd == bwd == computed
        assert computed + skipped == 4 * len(result["calls"])


@pytest.mark.parametrize("name", CASES)
def test_cp2_matches_unsharded(cp2, name):
    inputs, (result,) = cp2[name]
    _check(inputs, result, CASES[name][4])
    _check_calls(inputs, result)


@pytest.mark.parametrize("name", CASES)
def test_cp4_matches_unsharded(cp4, name):
    inputs, (result,) = cp4[name]
    _check(inputs, result, CASES[name][4])
    _check_calls(inputs, result)


def test_cp_groups_are_subgroups(tmp_path):
    """CP groups inside a larger world: global ranks [0, 2] (strided, as under TP x CP: the ring maps
    CP ranks to global ranks through the group) and [1] (a one-rank group: no communication)."""
    cases = {"gqa_window_documents": CASES["gqa_window_documents"]}
    results = _launch(tmp_path, 3, [[0, 2], [1]], cases)
    inputs, per_group = results["gqa_window_documents"]
    for result in per_group:
        _check(inputs, result, torch.float32)
        _check_calls(inputs, result)


def test_cp2_triton_interpreter(tmp_path):
    """backend "triton": pretrain_kernels' block ops, run by the Triton interpreter on CPU."""
    results = _launch(tmp_path, 2, [[0, 1]], TRITON_CASES, env={"TRITON_INTERPRET": "1"})
    for name, (inputs, (result,)) in results.items():
        assert result["kernel_backend"] == "triton"
        _check(inputs, result, torch.float32)
        _check_calls(inputs, result)


@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("documents", [False, True])
def test_cp1_matches_unsharded(window, documents):
    """cp_size 1 (group None): no communication, the same blocks."""
    case = _inputs((4, 2, window, documents, torch.float32, "eager"), seed=7)
    q, k, v = (case[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out = ring_attention(q, k, v, group=None, window=window, segments=case["segments"], backend="eager")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), case["grad_out"])
    _check(case, {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}, torch.float32)


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_shard_unshard_round_trip(cp_size):
    x = torch.randn(2, 3, SEQ, 5)
    parts = [shard_sequence(x, 2, cp_size, r) for r in range(cp_size)]
    assert all(p.is_contiguous() and p.shape[2] == SEQ // cp_size for p in parts)
    assert torch.equal(unshard_sequence(parts, 2), x)
    positions = torch.cat([chunk_positions(SEQ, cp_size, r) for r in range(cp_size)])
    assert torch.equal(positions.sort().values, torch.arange(SEQ))


def test_chunk_positions_are_load_balanced():
    c = SEQ // 8
    assert chunk_positions(SEQ, 4, 1).tolist() == [*range(c, 2 * c), *range(6 * c, 7 * c)]


def test_indivisible_sequence_is_rejected():
    with pytest.raises(ValueError, match=r"sequence length 30 .* 2 \* context parallel size = 8"):
        chunk_positions(30, 4, 0)
    with pytest.raises(ValueError, match="30"):
        shard_sequence(torch.zeros(1, 30), 1, 4, 0)


@pytest.mark.parametrize("cp_size", [1, 2, 4, 8])
def test_causal_plan_skips_upper_half_evenly(cp_size):
    """Without a window the group computes N(2N+1) of 4N^2 chunk pairs: 3 on a rank's own step, 2 on each other."""
    plans = [ring_plan(16 * cp_size, cp_size, r, None) for r in range(cp_size)]
    assert sum(p.skipped for p in plans) == 2 * cp_size ** 2 - cp_size
    for p in plans:
        assert [len(s) for s in p.steps] == [3] + [2] * (cp_size - 1)


def test_window_plan_skips_blocks_out_of_reach():
    """Window 6 over chunks of 4: a pair is kept only if some key is within 5 positions of some query."""
    plans = [ring_plan(SEQ, 4, r, WINDOW) for r in range(4)]
    c = SEQ // 8
    kept = {(p.q_start, p.k_start) for plan in plans for step in plan.steps for p in step}
    assert kept == {(i * c, j * c) for i in range(8) for j in range(8) if j <= i and (i - j) * c - (c - 1) < WINDOW}
    assert sum(p.skipped for p in plans) > 2 * 4 ** 2 - 4
