"""The kernels folder imported under a second name must not redefine the custom ops.

From the repository root (on sys.path as the working directory), `import kernels` finds this folder;
transformers does exactly that on import, probing for the PyPI package `kernels`. Running the files
again would make torch destroy pretrain_kernels' first op registrations, and their next call crashed
the process (a segmentation fault in CI, in the ring-attention tests after an HF export had run).
"""

import subprocess
import sys

from harness import REPO, child_env

SCRIPT = """
import importlib, torch
import pretrain_kernels as pk
q = torch.randn(1, 2, 8, 16, requires_grad=True)
before = pk.attention_block_forward(q.detach(), q.detach(), q.detach(), q_start=0, k_start=0)[0]
import transformers.activations  # probes importlib.import_module("kernels")
assert importlib.import_module("kernels") is pk
try:
    import kernels.ops
except ImportError as e:
    assert "import this module as pretrain_kernels.ops" in str(e), e
else:
    raise AssertionError("kernels.ops imported under a second name")
after = pk.attention_block_forward(q.detach(), q.detach(), q.detach(), q_start=0, k_start=0)[0]
assert torch.equal(before, after)
pk.causal_attention(q, q, q).sum().backward()
assert torch.isfinite(q.grad).all()
print("ok")
"""


def test_importing_the_folder_as_kernels_keeps_the_ops():
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", SCRIPT], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
