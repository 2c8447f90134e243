"""The kernel half of ``python -m pretrain.bench.gpu``: the Triton kernels against PyTorch, as rows.

Attention: forward and forward+backward TFLOP/s of the Triton kernel and of torch SDPA at the same
work (only the visible (query, key) pairs of the causal, windowed mask count; 4*D FLOPs a pair forward,
2.5x that backward: kernels/README.md), for causal MHA, GQA and a local window. Before timing a case,
both run at a small shape in bf16 against float64 (SDPA's math path on float64 copies of the same
inputs), output and the three gradients; the kernel passes when its largest error is at most twice
SDPA's own bf16 error plus 1e-3. RMSNorm and rotary: GB/s of the minimum traffic against eager
PyTorch, with the same float64 check.

On CPU (``--smoke``) the same code runs tiny shapes in the Triton interpreter; its timings mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain_kernels import reference
from pretrain_kernels.bench import bench_ms

ERROR_FACTOR, ERROR_FLOOR = 2.0, 1e-3  # triton error <= 2 x SDPA's bf16 error + 1e-3


@dataclass(frozen=True)
class AttentionCase:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    window: int  # 0: full causal


GPU_CASES = (AttentionCase("causal", 16, 16, 128, 0), AttentionCase("gqa", 32, 8, 128, 0),
             AttentionCase("window", 16, 16, 128, 1024))
SMOKE_CASES = (AttentionCase("causal", 2, 2, 32, 0), AttentionCase("gqa", 4, 2, 32, 0),
               AttentionCase("window", 2, 2, 32, 16))


def _mask(seq: int, window: int, device) -> torch.Tensor:
    return reference.causal_window_mask(seq, window, torch.device(device))


def sdpa(q, k, v, window: int):
    gqa = k.shape[1] != q.shape[1]
    if window:  # no flash path takes a band: an explicit mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(q.shape[2], window, q.device), enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def triton_attention(q, k, v, window: int):
    import pretrain_kernels as pk

    return pk.causal_attention(q, k, v, window=window or None)


def _outputs(fn, q, k, v, grad, window):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, window)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return out, dq, dk, dv


def _max_error(got, want) -> float:
    return max(float((g.detach().double() - w).abs().max() / w.abs().max().clamp_min(1e-30)) for g, w in zip(got, want))


def check_attention(case: AttentionCase, seq: int, device: str) -> dict:
    """Triton and SDPA in bf16 against float64 SDPA: relative max errors over out, dq, dk, dv."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    shapes = ((1, case.q_heads, seq, case.head_dim), (1, case.kv_heads, seq, case.head_dim))
    q, k, v, grad = (torch.randn(shapes[i], generator=gen).to(device) for i in (0, 1, 1, 0))
    want = _outputs(sdpa, *(t.double() for t in (q, k, v, grad)), case.window)
    low = [t.bfloat16() for t in (q, k, v, grad)]
    errors = {name: _max_error(_outputs(fn, *low, case.window), want)
              for name, fn in (("triton", triton_attention), ("sdpa", sdpa))}
    limit = ERROR_FACTOR * errors["sdpa"] + ERROR_FLOOR
    return {"case": case.name, "seq": seq, "triton_error": errors["triton"], "sdpa_error": errors["sdpa"],
            "limit": limit, "passed": errors["triton"] <= limit}


def time_attention(case: AttentionCase, seq: int, tokens: int, device: str) -> list[dict]:
    from pretrain_kernels import triton_attention as kernel

    batch = max(1, tokens // seq)
    q, k, v = (torch.randn(batch, h, seq, case.head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
               for h in (case.q_heads, case.kv_heads, case.kv_heads))
    grad = torch.randn_like(q)
    work = kernel.flops(batch, case.q_heads, seq, case.head_dim, case.window or None)
    rows = []
    for mode in ("fwd", "fwd_bwd"):
        timed = {}
        for name, fn in (("sdpa", sdpa), ("triton", triton_attention)):
            if mode == "fwd":
                step = lambda fn=fn: fn(q, k, v, case.window)  # noqa: E731
            else:
                step = lambda fn=fn: torch.autograd.grad(fn(q, k, v, case.window), (q, k, v), grad)  # noqa: E731
            try:
                timed[name] = bench_ms(step, device)
            except torch.OutOfMemoryError:
                timed[name] = None
                torch.cuda.empty_cache()
        tflops = {n: (work[mode] / ms / 1e9 if ms else None) for n, ms in timed.items()}
        rows.append({"case": case.name, "seq": seq, "batch": batch, "mode": mode, "q_heads": case.q_heads,
                     "kv_heads": case.kv_heads, "head_dim": case.head_dim, "window": case.window,
                     "sdpa_ms": timed["sdpa"], "triton_ms": timed["triton"], "sdpa_tflops": tflops["sdpa"],
                     "triton_tflops": tflops["triton"],
                     "triton_vs_sdpa": (timed["sdpa"] / timed["triton"]) if all(timed.values()) else None})
    return rows


def norm_rope(device: str, smoke: bool) -> list[dict]:
    """RMSNorm and rotary: GB/s against eager PyTorch, and bf16 error against float64 for both."""
    import pretrain_kernels as pk

    gen = torch.Generator(device="cpu").manual_seed(0)  # the same inputs, so the same check, every run

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    rows = []
    for tokens, hidden in ((64, 128),) if smoke else ((16384, 2048), (16384, 4096)):
        x = randn(tokens, hidden)
        w = torch.rand(hidden, generator=gen).to(device, torch.bfloat16)
        want = F.rms_norm(x.double(), (hidden,), w.double(), 1e-5)
        fns = {"triton": lambda: pk.rms_norm(x, w, 1e-5), "torch": lambda: F.rms_norm(x, (hidden,), w, 1e-5)}
        rows.append(_memory_row(f"rms_norm {tokens}x{hidden}", fns, 2 * x.numel() * 2, device, lambda y: [y], [want]))
    for seq, dim in ((64, 32),) if smoke else ((4096, 128),):
        b, hq, hkv = (1, 2, 1) if smoke else (4, 16, 8)
        q, k = randn(b, hq, seq, dim), randn(b, hkv, seq, dim)
        cos, sin = randn(seq, dim, dtype=torch.float32), randn(seq, dim, dtype=torch.float32)
        want = [reference.rotary(t.double(), cos.double(), sin.double()) for t in (q, k)]
        fns = {"triton": lambda: pk.apply_rotary(q, k, cos, sin),
               "torch": lambda: (reference.rotary(q, cos, sin), reference.rotary(k, cos, sin))}
        rows.append(_memory_row(f"rotary B{b} Hq{hq} Hkv{hkv} S{seq} D{dim}", fns, 2 * (q.numel() + k.numel()) * 2,
                                device, list, want))
    return rows


def _memory_row(name: str, fns: dict, moved: int, device: str, outputs, want) -> dict:
    errors = {n: _max_error(outputs(fn()), want) for n, fn in fns.items()}
    ms = {n: bench_ms(fn, device) for n, fn in fns.items()}
    limit = ERROR_FACTOR * errors["torch"] + ERROR_FLOOR
    return {"kernel": name, "triton_ms": ms["triton"], "torch_ms": ms["torch"],
            "triton_gbps": moved / ms["triton"] / 1e6, "torch_gbps": moved / ms["torch"] / 1e6,
            "triton_vs_torch": ms["torch"] / ms["triton"], "triton_error": errors["triton"],
            "torch_error": errors["torch"], "passed": errors["triton"] <= limit}


def run(device: str, smoke: bool) -> dict:
    """Every kernel row: {"attention_checks", "attention", "norm_rope"}."""
    import pretrain_kernels as pk

    pk.set_backend("triton")
    cases, seqs, tokens = (SMOKE_CASES, (32, 64), 128) if smoke else (GPU_CASES, (1024, 2048, 4096, 8192), 16384)
    checks = [check_attention(case, seqs[0] if smoke else 512, device) for case in cases]
    timings = [row for case in cases for seq in seqs for row in time_attention(case, seq, tokens, device)]
    return {"attention_checks": checks, "attention": timings, "norm_rope": norm_rope(device, smoke)}
