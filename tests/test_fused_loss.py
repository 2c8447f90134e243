"""The fused linear + cross-entropy against logits followed by megatron-core's loss, in one process:
the loss and both gradients, several chunk sizes, and the loss alone under no_grad (evaluation)."""

import os

import pytest
import torch

from pretrain.config import ParallelConfig


@pytest.fixture(scope="module")
def one_process_group():
    from pretrain.engine import groups

    saved = dict(os.environ)
    groups.init_distributed(ParallelConfig())
    yield
    groups.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def _inputs(seed=0, s=13, b=3, h=16, vocab=40):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(s, b, h, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, h, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (b, s), generator=gen)
    return x, w, labels


@pytest.mark.parametrize("chunk", [1, 5, 39, 1000])
def test_loss_and_gradients_equal_the_unfused_path(one_process_group, chunk):
    from pretrain.model.fused_loss import fused_lm_loss
    from pretrain.model.layers import lm_loss

    x, w, labels = _inputs()
    want = lm_loss(torch.einsum("sbh,vh->sbv", x, w), labels)
    want_dx, want_dw = torch.autograd.grad(want, (x, w))
    got = fused_lm_loss(x, w, labels, chunk, sequence_parallel=False)
    got_dx, got_dw = torch.autograd.grad(got * 3.0, (x, w))  # the incoming gradient scales both
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=0)
    torch.testing.assert_close(got_dx, 3.0 * want_dx, rtol=1e-5, atol=1e-7)  # both compute the logits in fp32
    torch.testing.assert_close(got_dw, 3.0 * want_dw, rtol=1e-5, atol=1e-7)  # both compute the logits in fp32


def test_evaluation_computes_the_same_loss_without_gradients(one_process_group):
    from pretrain.model.fused_loss import fused_lm_loss

    x, w, labels = _inputs(seed=1)
    with torch.no_grad():
        evaluated = fused_lm_loss(x, w, labels, 4, sequence_parallel=False)
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, fused_lm_loss(x, w, labels, 4, sequence_parallel=False).detach(),
                               rtol=0, atol=0)
