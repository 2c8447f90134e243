"""Model FLOPs per token and the machine's measured matmul throughput (for MFU)."""

from __future__ import annotations

import time

import torch

from pretrain.config import ModelConfig
from pretrain.model.layers import ffn_hidden_size, head_dim


def matmul_parameters(cfg: ModelConfig, vocab: int) -> int:
    """Parameters that take part in a matmul per token: the blocks' projections and the LM head.

    The embedding lookup costs no FLOPs, but the output projection does (tied or not).
    """
    h, d = cfg.hidden_size, head_dim(cfg)
    heads, kv = cfg.num_attention_heads, cfg.num_kv_heads or cfg.num_attention_heads
    ffn = ffn_hidden_size(cfg)
    attention = h * (heads + 2 * kv) * d + heads * d * h
    mlp = h * ffn * (3 if cfg.activation == "swiglu" else 2)
    return cfg.num_layers * (attention + mlp) + vocab * h


def model_flops_per_token(cfg: ModelConfig, seq_length: int, vocab: int) -> int:
    """Forward + backward FLOPs per token: 6 N + 12 L (heads * d_head) s (REFERENCE.md; attention
    counted over the full s x s score matrix, as in the Megatron and PaLM MFU conventions)."""
    return 6 * matmul_parameters(cfg, vocab) + 12 * cfg.num_layers * cfg.num_attention_heads * head_dim(cfg) * seq_length


def measured_matmul_flops(size: int = 1024, dtype=torch.float32, seconds: float = 1.0, device="cpu") -> float:
    """Sustained FLOP/s of square matmuls on this device: the achievable peak to compare against."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - start)


# Dense peak FLOP/s per GPU from the vendors' data sheets (SXM parts): bf16, and TF32 for fp32 runs.
GPU_PEAK_FLOPS = {
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "H100": {"bf16": 989e12, "fp32": 494e12},
    "H200": {"bf16": 989e12, "fp32": 494e12},
}


def peak_flops(precision: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from) for MFU.

    Known GPUs from the table; anything else, the CPU included, is measured with square matmuls.
    """
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peaks in GPU_PEAK_FLOPS.items():
            if key in name:
                return peaks[precision], f"{key} data sheet"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return measured_matmul_flops(4096, dtype, device="cuda"), f"measured on {name}"
    return measured_matmul_flops(), "measured CPU fp32 matmul"
