"""Document masking (``model.document_mask``): in packed rows, attention never crosses an end-of-text token.

Segment ids come from the tokens (``attention.segment_ids``): an end-of-text token closes its
document, the next token opens the next one. Positions stay global (Llama 3 does not reset them).
The Triton kernel is checked against sdpa with the same mask, and for these exact zeros, in
tests/kernels/test_kernels_segments.py (where the interpreter is set before Triton is imported).
Wall time: ~15 s on 2 busy cores.
"""

import dataclasses
import os

import pytest
import torch

from pretrain.config import compose_training
from pretrain.model import attention
from pretrain.validate import ConfigError, validate

EOD = 0


def _rows():
    """Two packed rows of 32 tokens: documents end at positions 9 and 20 (row 0) and 15 (row 1)."""
    tokens = torch.randint(1, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    tokens[0, 9] = tokens[0, 20] = tokens[1, 15] = EOD
    return tokens


def test_segment_ids_close_a_document_at_its_end_of_text_token():
    seg = attention.segment_ids(_rows(), EOD)
    assert seg.dtype == torch.int32
    assert seg[0].tolist() == [0] * 10 + [1] * 11 + [2] * 11
    assert seg[1].tolist() == [0] * 16 + [1] * 16


def check_weights_across_documents(backend: str) -> None:
    """With v the identity (head dim = sequence length), attention returns its weight matrix: exactly
    zero from a query to any key of another document, positive to every earlier key of its own."""
    seg = attention.segment_ids(_rows(), EOD)
    b, heads, s = 2, 2, 32
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(b, heads, s, s, generator=g), torch.randn(b, heads, s, s, generator=g)
    v = torch.eye(s).expand(b, heads, s, s).contiguous()
    weights = attention.attention(q, k, v, None, 0.0, backend, seg)  # (b, heads, query, key)
    same_doc = seg[:, None, :, None] == seg[:, None, None, :]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    assert torch.all(weights[(~same_doc).expand(b, heads, s, s)] == 0.0)
    assert torch.all(weights[(same_doc & causal).expand(b, heads, s, s)] > 0.0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(b, heads, s))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_attention_weights_across_an_end_of_text_boundary_are_exactly_zero(backend):
    check_weights_across_documents(backend)  # triton: tests/kernels/test_kernels_segments.py


def test_a_document_never_sees_the_one_before_it():
    """Changing the first document of a row leaves the model's logits on the next documents unchanged,
    exactly; without the mask they change."""
    from pretrain.config import ModelConfig, ParallelConfig
    from pretrain.engine import groups
    from pretrain.model.gpt import build_model
    from pretrain.model.init import apply_init

    saved = dict(os.environ)
    groups.init_distributed(ParallelConfig())
    try:
        cfg = ModelConfig(name="doc", num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128,
                          max_position_embeddings=64, document_mask=True, eod_token_id=EOD)
        tokens = _rows()
        other = tokens.clone()
        other[0, :9] = (tokens[0, :9] + 7) % 100 + 1  # row 0's first document, its end-of-text kept
        for masked in (True, False):
            model_cfg = dataclasses.replace(cfg, document_mask=masked)
            model = build_model(model_cfg, ParallelConfig()).eval()
            apply_init(model, model_cfg, seed=3)
            with torch.no_grad():
                a, b = model.logits(tokens), model.logits(other)  # (s, b, vocab)
            assert not torch.equal(a[:10, 0], b[:10, 0])
            if masked:
                assert torch.equal(a[10:], b[10:])
            else:
                assert not torch.equal(a[10:, 0], b[10:, 0])
    finally:
        groups.shutdown()
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("overrides, message", [
    (["model.document_mask=true"], "needs model.eod_token_id"),
    (["model.document_mask=true", "model.eod_token_id=0", "parallel=pp2"], "use pipeline=1 or document_mask=false"),
    (["model.fused_loss_chunk=0"], "model.fused_loss_chunk=0 must be >= 1"),
    (["parallel.activation_checkpointing=sometimes"], "is not one of none, full, every, selective"),
])
def test_bad_settings_are_refused_with_the_fix(overrides, message):
    cfg = compose_training(["data=synthetic", *overrides])
    world = 2 if "parallel=pp2" in overrides else 1
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=world)


def test_selective_recompute_and_document_mask_are_accepted():
    validate(compose_training(["data=synthetic", "parallel.activation_checkpointing=selective",
                               "model.document_mask=true", "model.eod_token_id=0"]), world_size=1)


def test_prepared_data_supplies_the_end_of_text_id():
    """With prepared data, document masking takes the tokenizer's end-of-text id (the trainer's
    ``with_vocab``); a given id wins, and without document masking nothing is set."""
    from pretrain.config import typed
    from pretrain.train.build import with_vocab

    validate(compose_training(["data=tiny", "model.document_mask=true"]), world_size=1)  # no id needed up front
    masked = typed(compose_training(["data=tiny", "model.document_mask=true"])).model
    assert with_vocab(masked, 512, eod=3).eod_token_id == 3
    given = typed(compose_training(["data=tiny", "model.document_mask=true", "model.eod_token_id=7"])).model
    assert with_vocab(given, 512, eod=3).eod_token_id == 7
    plain = typed(compose_training(["data=tiny"])).model
    assert with_vocab(plain, 512, eod=3).eod_token_id is None
