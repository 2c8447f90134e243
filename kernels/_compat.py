"""What differs between the Triton versions the kernels are tested with: 3.6 and 3.9 (issue 18).

Two differences matter to these kernels:

* `tl.dot(a, b, acc)`: Triton 3.8+ takes the result dtype from `acc` (out_dtype=None); 3.6 and 3.7
  default out_dtype to fp32 and assert `acc.dtype == out_dtype`, so an fp64 accumulator fails.
  The attention kernels pass `out_dtype=acc.dtype` at every accumulating dot: valid in all.

* CPU interpreter only (TRITON_INTERPRET=1; GPU runs never touch the patch below): Triton 3.6's
  interpreter turns a runtime scalar into a Python int with `int(handle.data)`, where
  the data is a 1-element, 1-D NumPy array. NumPy >= 2.4 (the project pins 2.4.6) raises
  "TypeError: only 0-dimensional arrays can be converted to Python scalars" there, so every
  `for i in range(lo, hi, STEP)` with runtime bounds fails. Triton 3.7+ squeezes the array first
  (checked in the 3.7.1, 3.8.0 and 3.9.0 sources). `patch_interpreter()` installs that conversion
  on older interpreters.

One more thing is the same in every version and easy to get wrong: `@triton.jit` binds each function
to the interpreter or the compiler when it is defined, reading TRITON_INTERPRET then, and
triton.language's own functions (tl.max, tl.sum, tl.cdiv, ...) are defined when triton is first
imported, often by another library (megatron-core, DeepSpeed). TRITON_INTERPRET=1 set after that runs
our kernels interpreted but leaves those functions compiled, and the first kernel call fails with
"Cannot call @triton.jit'd outside of the scope of a kernel". `check_binding()` names the problem.

Run the kernel tests with Triton 3.6 via .ci/triton_versions.sh.
"""

from __future__ import annotations

import re

import triton

from . import _backend


def _version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"cannot read the Triton version {text!r}")
    return int(match.group(1)), int(match.group(2))


TRITON_VERSION = _version(triton.__version__)
# First version whose interpreter converts scalars with .squeeze() (3.7.1's source does, 3.6.0's not).
_INTERPRETER_INDEX_FIXED = (3, 7)

_patched = False


def check_binding() -> None:
    """Fail with the fix when triton.language was bound for the other mode than TRITON_INTERPRET's."""
    from triton.language import standard
    from triton.runtime.jit import JITFunction

    language_interpreted = not isinstance(standard.max, JITFunction)
    if language_interpreted == _backend.interpreting():
        return
    now, then = ("1", "unset or 0") if _backend.interpreting() else ("unset or 0", "1")
    raise RuntimeError(
        f"TRITON_INTERPRET is {now} now but was {then} when triton was first imported, so "
        "triton.language's functions (tl.max, tl.sum, ...) are bound for the other mode and every kernel "
        "call would fail; set TRITON_INTERPRET before the process imports triton (or torch-based "
        "libraries that import it, such as megatron-core and DeepSpeed), e.g. in the environment"
    )


def patch_interpreter() -> None:
    """Make Triton < 3.7's interpreter index with runtime scalars under NumPy >= 2.4. Idempotent.

    Call before launching kernels under the interpreter (the triton_* modules do it at import). Checks
    first that triton.language was imported in the same mode (check_binding).
    """
    global _patched
    check_binding()
    if _patched or not _backend.interpreting() or TRITON_VERSION >= _INTERPRETER_INDEX_FIXED:
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # Triton 3.7+'s definition; the scope restores the attribute after each launch.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    _patched = True
