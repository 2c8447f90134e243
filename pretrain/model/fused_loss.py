"""The LM head and the mean cross-entropy in one pass over token chunks (``model.fused_loss``).

The unfused path materialises fp32 logits [tokens, vocab / tp], keeps the softmax of the same size
for backward and then a gradient of that size again. Here each chunk of ``chunk`` tokens computes
its logits, the loss and at once the gradients with respect to the hidden states and the output
weight, so no more than one chunk of logits exists and backward only scales the stored gradients.

Vocab-parallel under TP like megatron-core's ``vocab_parallel_cross_entropy``: each rank holds a
contiguous vocabulary shard; the max, the sum of exponentials and the target logit are
all-reduced over the tensor-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel


def _tp_group():
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None, 0
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank()


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over tokens of CE(x @ weight^T, labels); x [n, h], weight [vocab / tp, h], labels [n]."""

    @staticmethod
    def forward(ctx, x, weight, labels, chunk: int):
        group, rank = _tp_group()
        n, shard = x.shape[0], weight.shape[0]
        grads = any(ctx.needs_input_grad[:2])  # evaluation (no_grad): the loss only
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # fp32 over chunks
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for i in range(0, n, chunk):
            xc = x[i:i + chunk]
            logits = (xc @ weight.t()).float()  # (c, vocab / tp)
            local = labels[i:i + chunk] - rank * shard
            mine = (local >= 0) & (local < shard)
            local = torch.where(mine, local, 0)
            rows = torch.arange(local.shape[0], device=x.device)
            target = torch.where(mine, logits[rows, local], 0.0)
            top = logits.max(dim=1).values
            if group is not None:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            probs = logits.sub_(top[:, None]).exp_()  # in place: one chunk of logits at a time
            sums = torch.stack([probs.sum(dim=1), target])
            if group is not None:
                dist.all_reduce(sums, group=group)
            total += (sums[0].log() + top - sums[1]).sum()
            if not grads:
                continue
            probs.div_(sums[0][:, None])  # softmax
            probs[rows, local] -= mine.float()  # minus the one-hot target: d CE / d logits
            grad = probs.div_(n).to(x.dtype)  # d mean / d logits
            torch.matmul(grad, weight, out=grad_x[i:i + chunk])
            if xc.dtype == torch.float32:
                grad_w.addmm_(grad.t(), xc)
            else:  # 16-bit matmul (fp32 accumulation inside it), summed over chunks in fp32
                grad_w += (grad.t() @ xc).float()
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None


def fused_lm_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                  sequence_parallel: bool) -> torch.Tensor:
    """Mean next-token loss from the final hidden states, as ``lm_loss(x @ weight^T, labels)``.

    x [s / tp if SP else s, b, h] (sequence-first), weight [vocab / tp, h], labels [b, s]; chunk in
    tokens. Called on every TP rank of the last stage; all of them return the same loss.
    """
    if sequence_parallel:
        x = tensor_parallel.gather_from_sequence_parallel_region(x)
    else:
        x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
    s, b, h = x.shape
    return _LinearCrossEntropy.apply(x.reshape(s * b, h), weight, labels.t().reshape(s * b), chunk)
