"""GPU benchmark of the kernels against PyTorch (and flash-attn when installed).

    python -m pretrain_kernels.bench                       # defaults: bf16, S 512..16k, D 64 and 128
    python -m pretrain_kernels.bench --head-dims 128 --kv-heads 4 --window 1024 --seq-lens 4096,16384

Attention: forward and forward+backward, the Triton kernel vs torch SDPA (is_causal, enable_gqa) and
flash_attn_func, each at the same work: TFLOP/s count only the visible (query, key) pairs of the causal
(and windowed) mask, 4*D FLOPs per pair forward and 2.5x that backward (see README.md). With a window,
SDPA gets an explicit boolean mask (no flash path exists for it), so its ratio shows what the window saves.
RMSNorm and rotary: GB/s of the minimum traffic (read inputs once, write outputs once) vs eager PyTorch.
On a machine without a CUDA GPU it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m pretrain_kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--hidden", type=int, default=2048, help="query heads = hidden / head dim")
    p.add_argument("--kv-heads", type=int, default=0, help="KV heads (0: as many as query heads)")
    p.add_argument("--tokens", type=int, default=16384, help="batch = max(1, tokens / seq len)")
    p.add_argument("--window", type=int, default=0, help="local attention window (0: full causal)")
    p.add_argument("--skip-norm-rope", action="store_true")
    p.add_argument("--device", default="cuda",
                   help="'cpu' runs the same code under TRITON_INTERPRET=1 as a smoke test (timings meaningless)")
    return p.parse_args(argv)


def bench_ms(fn, device: str) -> float:
    """Milliseconds of one call: triton.testing.do_bench on CUDA; on CPU (the interpreter) one timed call."""
    if device == "cpu":
        import time

        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


def _providers(args):
    import torch.nn.functional as F

    import pretrain_kernels as pk

    def triton_attn(q, k, v):
        return pk.causal_attention(q, k, v, window=args.window or None)

    def sdpa(q, k, v):
        s = q.shape[2]
        if args.window:
            i = torch.arange(s, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < args.window)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])

    providers = {"sdpa": sdpa, "triton": triton_attn}  # sdpa first: the baseline of the ratios
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]

        def flash(q, k, v):
            window = (args.window - 1, 0) if args.window else (-1, -1)
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                  window_size=window)
            return out.transpose(1, 2)

        providers["flash_attn"] = flash
    except ImportError:
        pass
    return providers


def bench_attention(args) -> None:
    from pretrain_kernels import triton_attention

    dtype = DTYPES[args.dtype]
    providers = _providers(args)
    print(f"causal attention, {args.dtype}, hidden {args.hidden}, ~{args.tokens} tokens per call"
          + (f", window {args.window}" if args.window else "") + f"; providers: {', '.join(providers)}")
    print(f"{'S':>6} {'D':>4} {'B':>3} {'Hq':>3} {'Hkv':>3} {'mode':>8} {'provider':>10} {'ms':>9} {'TFLOP/s':>8} {'vs sdpa':>8}")  # noqa: E501
    for d in (int(x) for x in args.head_dims.split(",")):
        hq = args.hidden // d
        hkv = args.kv_heads or hq
        for s in (int(x) for x in args.seq_lens.split(",")):
            b = max(1, args.tokens // s)
            q, k, v = (torch.randn(b, h, s, d, device=args.device, dtype=dtype, requires_grad=True)
                       for h in (hq, hkv, hkv))
            do = torch.randn_like(q)
            flops = triton_attention.flops(b, hq, s, d, args.window or None)
            sdpa_ms = {}
            for mode in ("fwd", "fwd_bwd"):
                for name, fn in providers.items():
                    if mode == "fwd":
                        step = lambda fn=fn: fn(q, k, v)  # noqa: E731
                    else:
                        step = lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), do)  # noqa: E731
                    try:
                        ms = bench_ms(step, args.device)
                    except torch.OutOfMemoryError:
                        print(f"{s:>6} {d:>4} {b:>3} {hq:>3} {hkv:>3} {mode:>8} {name:>10} {'OOM':>9}")
                        torch.cuda.empty_cache()
                        continue
                    if name == "sdpa":
                        sdpa_ms[mode] = ms
                    ratio = sdpa_ms[mode] / ms if mode in sdpa_ms else float("nan")
                    print(f"{s:>6} {d:>4} {b:>3} {hq:>3} {hkv:>3} {mode:>8} {name:>10} {ms:>9.3f} "
                          f"{flops[mode] / ms / 1e9:>8.1f} {ratio:>7.2f}x")
            del q, k, v, do
            if args.device == "cuda":
                torch.cuda.empty_cache()


def bench_norm_rope(args) -> None:
    import torch.nn.functional as F

    import pretrain_kernels as pk
    from pretrain_kernels import reference

    dtype = DTYPES[args.dtype]
    size = dtype.itemsize if hasattr(dtype, "itemsize") else torch.finfo(dtype).bits // 8
    print(f"\nRMSNorm and rotary, {args.dtype} (GB/s of the minimum traffic)")
    dev = args.device
    small = dev == "cpu"
    for tokens, hidden in ((64, 128),) if small else ((16384, 2048), (16384, 4096), (8192, 8192)):
        x = torch.randn(tokens, hidden, device=dev, dtype=dtype)
        w = torch.rand(hidden, device=dev, dtype=dtype)
        moved = 2 * x.numel() * size  # read x, write y
        for name, fn in (("triton", lambda: pk.rms_norm(x, w, 1e-5)),
                         ("torch", lambda: F.rms_norm(x, (hidden,), w, 1e-5))):
            ms = bench_ms(fn, dev)
            print(f"  rms_norm fwd {tokens}x{hidden} {name:>7}: {ms:8.3f} ms {moved / ms / 1e6:8.1f} GB/s")
    for s, d in ((64, 32),) if small else ((4096, 128), (8192, 64)):
        b, hq, hkv = (1, 2, 1) if small else (4, 2048 // d, 8)
        q = torch.randn(b, hq, s, d, device=dev, dtype=dtype)
        k = torch.randn(b, hkv, s, d, device=dev, dtype=dtype)
        cos, sin = torch.randn(s, d, device=dev), torch.randn(s, d, device=dev)
        moved = 2 * (q.numel() + k.numel()) * size
        for name, fn in (("triton", lambda: pk.apply_rotary(q, k, cos, sin)),
                         ("torch", lambda: (reference.rotary(q, cos, sin), reference.rotary(k, cos, sin)))):
            ms = bench_ms(fn, dev)
            print(f"  rotary B{b} Hq{hq} Hkv{hkv} S{s} D{d} {name:>7}: {ms:8.3f} ms {moved / ms / 1e6:8.1f} GB/s")


def main(argv=None) -> int:
    args = _parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"pretrain_kernels.bench: no CUDA GPU available (torch {torch.__version__}); "
              "this benchmark times GPU kernels, so there is nothing to run here.")
        return 0
    import pretrain_kernels as pk

    pk.set_backend("triton")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none (interpreter smoke run)"
    print(f"GPU: {gpu}, torch {torch.__version__}")
    bench_attention(args)
    if not args.skip_norm_rope:
        bench_norm_rope(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
