"""kernels/_compat.py: the Triton-version differences (issue 18; .ci/triton_versions.sh runs Triton 3.6)."""

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from pretrain_kernels import _compat


@pytest.mark.parametrize("text,version", [("3.6.0", (3, 6)), ("3.9.0", (3, 9)), ("3.10.1+git0abc", (3, 10))])
def test_version_parsing(text, version):
    assert _compat._version(text) == version


def test_version_of_installed_triton():
    assert _compat.TRITON_VERSION == _compat._version(triton.__version__) >= (3, 6)


@triton.jit
def _runtime_range_sum(X, OUT, lo, hi, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # A loop with runtime bounds (Triton 3.6's interpreter needs the patch) and an accumulating dot
    # with an fp64 accumulator (Triton < 3.8 needs out_dtype).
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK], dtype=ACC)
    for start in range(lo, hi, BLOCK):
        x = tl.load(X + (start + offs)[:, None] * BLOCK + offs[None, :])
        acc = tl.dot(x, x, acc, input_precision="ieee", out_dtype=acc.dtype)
    tl.store(OUT + offs[:, None] * BLOCK + offs[None, :], acc)


def test_runtime_range_and_fp64_dot_accumulator():
    _compat.patch_interpreter()
    block = 16
    x = torch.randn(3 * block, block, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = torch.empty(block, block, dtype=torch.float64)
    _runtime_range_sum[(1,)](x, out, block, 3 * block, BLOCK=block, ACC=tl.float64)
    expect = sum(c @ c for c in x[block:].split(block))
    torch.testing.assert_close(out, expect)


@pytest.mark.parametrize("first,then", [("0", "1"), ("1", "0")])
def test_interpret_mode_changed_after_triton_was_imported_is_named(first, then):
    # triton.language binds its functions at import; a kernel module imported in the other mode names it.
    code = (
        "import os, triton.language\n"
        f"os.environ['TRITON_INTERPRET'] = {then!r}\n"
        "from pretrain_kernels import triton_norm\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": first}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "when triton was first imported" in run.stderr and "set TRITON_INTERPRET before" in run.stderr


def test_the_test_session_imported_triton_in_interpreter_mode():
    # tests/conftest.py chose the mode before megatron-core or DeepSpeed could import triton.
    _compat.check_binding()
    assert not isinstance(tl.standard.max, triton.runtime.jit.JITFunction)
