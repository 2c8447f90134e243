"""Fused RMSNorm in Triton: y = x / sqrt(mean(x^2) + eps) * weight, fp32 (fp64 for fp64) accumulation.

The forward saves 1/rms per row (4 bytes per row) so the backward reads x, dy and weight once each.
The weight gradient is summed per program into a [programs, N] buffer, then over programs in torch:
deterministic, and no atomics (bf16 atomics do not exist).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._compat import patch_interpreter

patch_interpreter()  # Triton < 3.7 interpreter under NumPy >= 2.4; see _compat


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / n_cols + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd(X, W, DY, RSTD, DX, DW_PARTIAL, stride_x, stride_dy, stride_dx, n_rows, n_cols,
                  rows_per_program, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    # dx = rstd * (w*dy - xhat * mean(xhat * w*dy)),  dw = sum_rows dy * xhat,  xhat = x * rstd
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0).to(ACC)
        xhat = x * rstd[:, None]
        wdy = dy * w[None, :]
        c = tl.sum(xhat * wdy, 1) / n_cols
        dx = rstd[:, None] * (wdy - xhat * c[:, None])
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, 0)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)


def _tiles(n_cols: int) -> tuple[int, int, int]:
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(64, 8192 // block_n))  # several short rows per program, one long row
    tile = block_m * block_n
    num_warps = 4 if tile <= 4096 else (8 if tile <= 16384 else 16)
    return block_m, block_n, num_warps


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def rms_norm_forward(x, weight, eps: float):
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    if m == 0:
        return y.reshape(x.shape), rstd.reshape(x.shape[:-1])
    block_m, block_n, num_warps = _tiles(n)
    _rms_norm_fwd[(triton.cdiv(m, block_m),)](
        x2, weight, y, rstd, x2.stride(0), y.stride(0), m, n, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, ACC=_acc(x.dtype), num_warps=num_warps,
    )
    return y.reshape(x.shape), rstd.reshape(x.shape[:-1])


def rms_norm_backward(grad_y, x, weight, rstd):
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    dy = grad_y.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    m = x2.shape[0]
    if m == 0:
        return torch.zeros_like(x), torch.zeros_like(weight)
    block_m, block_n, num_warps = _tiles(n)
    row_blocks = triton.cdiv(m, block_m)
    if x.is_cuda:
        programs = min(row_blocks, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    else:
        programs = min(row_blocks, 4)
    rows_per_program = triton.cdiv(row_blocks, programs) * block_m
    programs = triton.cdiv(m, rows_per_program)
    acc = _acc(x.dtype)
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = torch.empty((programs, n), dtype=torch.float64 if acc == tl.float64 else torch.float32,
                          device=x.device)
    _rms_norm_bwd[(programs,)](
        x2, weight, dy, rstd.reshape(-1), dx, partial, x2.stride(0), dy.stride(0), dx.stride(0), m, n,
        rows_per_program, BLOCK_M=block_m, BLOCK_N=block_n, ACC=acc, num_warps=num_warps,
    )
    return dx.reshape(x.shape), partial.sum(0).to(weight.dtype)
