"""Token-counted schedules and parameter groups."""

import math

import pytest
import torch

from pretrain.config import OptimConfig
from pretrain.train.optim import param_groups
from pretrain.train.schedule import batch_size_at, lr_at


def cfg(**kw):
    base = dict(lr=6e-4, min_lr_ratio=0.1, warmup_tokens=1000, decay_tokens=11000)
    base.update(kw)
    return OptimConfig(**base)


def test_lr_warms_up_linearly_then_cosine_decays_to_ten_percent_and_stays():
    c = cfg()
    assert lr_at(0, c, 10**9) == 0.0
    assert lr_at(500, c, 10**9) == pytest.approx(3e-4)
    assert lr_at(1000, c, 10**9) == pytest.approx(6e-4)
    assert lr_at(6000, c, 10**9) == pytest.approx(6e-5 + (6e-4 - 6e-5) * 0.5)  # half way: cos = 0
    assert lr_at(11000, c, 10**9) == pytest.approx(6e-5)
    assert lr_at(10**8, c, 10**9) == pytest.approx(6e-5)  # constant at 10% after the decay window


def test_lr_decays_over_the_whole_run_when_no_decay_window_is_set():
    c = cfg(decay_tokens=None)
    assert lr_at(5000, c, total_tokens=5000) == pytest.approx(6e-5)
    assert lr_at(3000, c, total_tokens=5000) == pytest.approx(6e-5 + (6e-4 - 6e-5) * 0.5)


def test_batch_ramp_grows_linearly_in_steps_of_micro_batch_times_dp():
    c = cfg(ramp_start_batch=4, ramp_tokens=1000)
    assert batch_size_at(0, c, global_batch=32, increment=4) == 4
    assert batch_size_at(500, c, global_batch=32, increment=4) == 16  # 4 + 28 * 0.5 = 18 -> 16
    sizes = [batch_size_at(t, c, 32, 4) for t in range(0, 1000, 10)]
    assert sizes == sorted(sizes) and all(s % 4 == 0 for s in sizes)
    assert batch_size_at(1000, c, 32, 4) == 32
    assert batch_size_at(0, cfg(), 32, 4) == 32  # no ramp configured


def test_no_weight_decay_on_biases_norms_and_optionally_embeddings():
    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.canonical_name = "embed"
            self.word = torch.nn.Embedding(10, 4)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.canonical_name = "blocks.0"
            self.lin = torch.nn.Linear(4, 4)
            self.ln = torch.nn.LayerNorm(4)

    model = torch.nn.Sequential(Fake(), Block())
    groups = param_groups(model, cfg(weight_decay=0.1))
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].word.weight), id(model[1].lin.weight)}
    groups = param_groups(model, cfg(weight_decay=0.1, decay_embeddings=False))
    assert {id(p) for p in groups[0]["params"]} == {id(model[1].lin.weight)}
