"""Selective activation recomputation keeps what Korthikanti et al. (2022, Table 2) say it keeps.

Bytes saved for backward by one transformer layer, counted with saved-tensor hooks, bf16 tensors:
  selective, no sequence parallelism:  s*b*h*(10 + 24/t)
  selective, sequence parallelism:     34*s*b*h/t
(s sequence, b micro-batch, h hidden, t tensor-parallel size).

How the model's layer maps onto the formula's terms (model options: GPT family, LayerNorm with
bias, GELU MLP of 4h, sdpa attention, attention and hidden dropout 0.1, tied embeddings unused here):
  LayerNorm inputs (ln1, ln2)                          2 x 2sbh   (/t with SP)
  QKV projection input (ln1 output)                    2sbh       (/t with SP: megatron-core keeps
                                                                   the shard and re-gathers it)
  attention core inputs q, k, v, recomputed from       6sbh/t     (the formula's Q, K for QK^T
                                                                   and V for attention over V)
  output projection input                              2sbh/t
  attention-out dropout mask (1 byte)                  sbh        (/t with SP)
  fc1 input (ln2 output)                               2sbh       (/t with SP)
  GELU input (fc1 output, bias included)               8sbh/t
  fc2 input (GELU output)                              8sbh/t
  MLP-out dropout mask (1 byte)                        sbh        (/t with SP)
What differs: the LayerNorms also keep fp32 mean and rstd per token (16*s*b bytes a layer, 0.3% here)
and the softmax, its dropout mask and the dropout output (the 5*a*s^2*b term) are not kept at all.
Parameters (which the linear layers also save) are not activations and are not counted. A tensor
saved twice (the same view) counts once.

The 2-process run (gloo, ~25 s wall on 2 cores) measures t = 1, t = 2 and t = 2 with SP in one
launch; the one-process test checks that recomputed dropout draws the same mask (<1 s).
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from harness import two_ranks

S, B, H, HEADS = 64, 2, 256, 4


def _saved_bytes(block, x, params) -> int:
    """Bytes of distinct non-parameter tensors saved for backward by ``block(x)``."""
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[(t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x)
    out.float().pow(2).mean().backward()  # the recomputation runs and gradients flow
    assert x.grad is not None and torch.isfinite(x.grad).all()
    return sum(seen.values())


def _measure(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain.config import ModelConfig, ParallelConfig
    from pretrain.engine import compat
    from pretrain.model.gpt import megatron_config
    from pretrain.model.layers import Block

    compat.apply()
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    cfg = ModelConfig(name="korthikanti", num_layers=1, hidden_size=H, num_attention_heads=HEADS,
                      hidden_dropout=0.1, attention_dropout=0.1)
    results = {}
    for name, tp, sp in (("t1", 1, False), ("t2", 2, False), ("t2_sp", 2, True)):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        compat.seed_model_parallel_rng(1234)
        parallel = ParallelConfig(tensor=tp, data=2 // tp, sequence_parallel=sp)
        for mode in ("none", "selective"):
            block = Block(cfg, megatron_config(parallel, params_dtype=torch.bfloat16), 0).train()
            block.attn.recompute_core = mode == "selective"
            with torch.no_grad():
                for p in block.parameters():
                    p.normal_(0.0, 0.02)
            params = {p.data_ptr() for p in block.parameters()}
            x = torch.randn(S // tp if sp else S, B, H, dtype=torch.bfloat16, requires_grad=True)
            results[f"{name}-{mode}"] = _saved_bytes(block, x, params)
        parallel_state.destroy_model_parallel()
    if rank == 0:
        with open(os.path.join(out_dir, "saved.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()




@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return two_ranks(_measure, tmp_path_factory.mktemp("recompute"))


@pytest.mark.distributed
@pytest.mark.parametrize("layout, t, sequence_parallel", [("t1", 1, False), ("t2", 2, False), ("t2_sp", 2, True)])
def test_selective_recompute_keeps_korthikanti_bytes_per_layer(saved, layout, t, sequence_parallel):
    sbh = S * B * H
    formula = 34 * sbh / t if sequence_parallel else sbh * (10 + 24 / t)
    got = saved[f"{layout}-selective"]
    assert abs(got - formula) <= 0.10 * formula, f"{layout}: {got} bytes saved, Korthikanti {formula:.0f}"
    # Without recomputation the attention core also keeps its s^2 softmax/dropout tensors.
    heads = HEADS // t
    assert saved[f"{layout}-none"] - got >= 2 * heads * S * S * B, saved


def test_recomputed_dropout_draws_the_same_mask():
    from pretrain.model.recompute import recompute

    def core(x):
        return F.dropout(x.exp(), 0.5, training=True) * x

    x = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(3)
    want = core(x)
    want.sum().backward()
    want_grad, x.grad = x.grad, None
    torch.manual_seed(3)
    got = recompute(core, x)
    torch.randn(10)  # other work between forward and backward moves the generator
    got.sum().backward()
    assert torch.equal(got, want)
    assert torch.equal(x.grad, want_grad)
