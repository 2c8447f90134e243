"""The planner's model of context parallelism (pretrain/plan: memory.py, time.py, search.py docstrings).

With cp ranks per sequence every per-token term counts s/cp tokens; ring attention keeps one fp32
log-sum-exp per head and token whichever block kernel it runs; model states shard over dp x cp; ring
transfers hide behind the attention blocks except the dK/dV hops, which the implementation waits for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.plan import predict
from pretrain.plan.check import _changes
from pretrain.plan.gpus import load_cluster
from pretrain.plan.memory import (FRAGMENTATION, GIB, RING_BLOCK_SCORE_BYTES, activation_bytes, layer_activation_bytes,
                                  logits_bytes, peak_memory, ring_buffer_bytes)
from pretrain.plan.search import MARGIN, search, write_plan
from pretrain.plan.spec import PlanError, Spec
from pretrain.plan.time import attention_core, dp_time, layer_gemms, ring_exposed, ring_transfers, step_time

REPO = Path(__file__).resolve().parents[1]


def llama7b(**kw) -> Spec:
    base = dict(layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, ffn=11008, vocab=32000, swiglu=True,
                bias=False, tied=False, rope=True, seq=32768, micro_batch=1, global_batch=8)
    return Spec(**{**base, **kw})


def h100(gpus: int, **links):
    return load_cluster({"gpu": "H100", "gpus": gpus, **links})


# --- memory -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activations_and_logits_per_rank_halve_at_cp2(recompute):
    one, two = llama7b(recompute=recompute), llama7b(recompute=recompute, cp=2)
    # Flash attention keeps the same per-token terms as the ring (lse, not scores): exactly half,
    # RoPE's cos/sin tables included (they cover the rank's positions only).
    assert layer_activation_bytes(two) == pytest.approx(layer_activation_bytes(one) / 2)
    assert activation_bytes(two, "only") == pytest.approx(activation_bytes(one, "only") / 2)
    assert logits_bytes(two) == pytest.approx(logits_bytes(one) / 2)


def test_the_ring_never_keeps_a_materialised_score_matrix():
    one = llama7b(attention="materialized")
    two = one.with_(cp=2, ring_attention="materialized")
    assert layer_activation_bytes(two) < layer_activation_bytes(one) / 10  # cp=1 keeps a s^2 per layer
    assert layer_activation_bytes(two) == layer_activation_bytes(two.with_(ring_attention="flash"))
    # The reference blocks' scores are a transient of one layer: one c x c block per head in fp32.
    chunk = two.seq // 4
    extra = ring_buffer_bytes(two) - ring_buffer_bytes(two.with_(ring_attention="flash"))
    assert extra == pytest.approx(RING_BLOCK_SCORE_BYTES * two.heads * chunk * chunk)


def test_ring_buffers_are_a_transient_of_cp_only():
    assert ring_buffer_bytes(llama7b()) == 0
    two = llama7b(cp=2)
    # fp32 dQ + dK/dV (sent and received) + bf16 K/V (held and received), per local token.
    per_token = 4 * 32 * 128 + 2 * 4 * 2 * 32 * 128 + 2 * 2 * 2 * 32 * 128
    assert ring_buffer_bytes(two) == pytest.approx(two.local_seq * per_token)
    assert ring_buffer_bytes(two.with_(tp=2)) == pytest.approx(ring_buffer_bytes(two) / 2)
    gpu = h100(2).gpu
    mem = peak_memory(two, gpu)
    assert mem.other == pytest.approx(gpu.overhead_gib * GIB + FRAGMENTATION * mem.activations + ring_buffer_bytes(two))


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_model_states_shard_over_data_times_context(zero):
    gpu = h100(4).gpu
    cp2 = peak_memory(llama7b(cp=2, dp=2, zero=zero, global_batch=8), gpu)
    dp4 = peak_memory(llama7b(dp=4, zero=zero, global_batch=8), gpu)
    assert (cp2.weights, cp2.grads, cp2.optimizer) == (dp4.weights, dp4.grads, dp4.optimizer)
    if zero == 0:  # replicated over the context group like over data
        single = peak_memory(llama7b(), gpu)
        assert cp2.states == single.states


# --- time -------------------------------------------------------------------------------------------

def test_compute_runs_on_the_local_tokens():
    one, two, c = llama7b(), llama7b(cp=2), h100(2)
    f1, b1 = attention_core(one, c)
    f2, b2 = attention_core(two, c)
    assert (f2, b2) == pytest.approx((f1 / 2, b1 / 2))  # the ring balances causal work over the ranks
    assert layer_gemms(two, c) == pytest.approx(layer_gemms(one, c) / 2, rel=0.01)


def test_ring_comm_is_zero_without_cp_and_positive_with_it():
    c = h100(2)
    assert step_time(llama7b(), c).cp_comm == 0 and ring_exposed(llama7b(), c) == (0.0, 0.0)
    t = step_time(llama7b(cp=2), c)
    assert t.cp_comm > 0 and "cp_comm" in t.breakdown()
    assert t.total == pytest.approx(sum(t.breakdown().values()), rel=1e-4)
    kv, dkv = ring_transfers(llama7b(cp=2), c)
    # One K and one V block of b x a_kv x s/cp x d: bf16 for K/V, fp32 for the dK/dV accumulators.
    elements = 2 * 32 * 16384 * 128
    bw, latency = c.hop(2)
    assert kv == pytest.approx(2 * elements / bw + latency) and dkv == pytest.approx(4 * elements / bw + latency)


def test_kv_transfers_are_exposed_only_when_bandwidth_is_low():
    spec = llama7b(cp=4)
    fast = h100(4)
    kv, dkv = ring_transfers(spec, fast)
    forward, backward = ring_exposed(spec, fast)
    assert forward == 0  # NVLink: each K/V hop hides behind a ring step's blocks
    assert backward == pytest.approx(4 * dkv)  # only the cp dK/dV hops, which nothing overlaps
    slow = h100(4, nvlink_bw=1e9)
    kv_slow, dkv_slow = ring_transfers(spec, slow)
    forward, backward = ring_exposed(spec, slow)
    att_f, att_b = attention_core(spec, slow)
    assert forward == pytest.approx(3 * (kv_slow - att_f / 4))  # cp - 1 hops, each less one step's blocks
    assert backward == pytest.approx(3 * max(0.0, kv_slow - att_b / 4) + 4 * dkv_slow)
    assert step_time(spec, slow).cp_comm > step_time(spec, fast).cp_comm


def test_a_context_group_beyond_a_node_runs_over_the_network():
    c = h100(16)
    assert c.hop(8) == c.link(8, 1)  # tp x cp = 8: NVLink
    bw, latency = c.hop(16)  # tp 8 x cp 2: each hop leaves the node on its own rail
    assert bw == pytest.approx(c.network_bw * c.gpu.network_eff) and latency == 2 * c.gpu.latency
    inside, across = llama7b(tp=4, cp=2, global_batch=8), llama7b(tp=8, cp=2, global_batch=8)
    assert ring_transfers(across, c)[1] > ring_transfers(inside, h100(8))[1]


def test_gradient_reduction_runs_over_data_times_context():
    c = h100(4)
    for zero in (0, 1, 2, 3):
        assert dp_time(llama7b(cp=2, dp=2, zero=zero), c) == dp_time(llama7b(dp=4, zero=zero), c)
    assert dp_time(llama7b(cp=2), h100(2)) == dp_time(llama7b(dp=2), h100(2))
    assert dp_time(llama7b(cp=2), h100(2))[0] > 0  # the context ranks' gradients are averaged too


def test_global_batch_and_gpus_count_context_ranks_as_the_brief_says():
    spec = llama7b(tp=2, cp=2, dp=2, global_batch=8)
    assert spec.gpus == 8 and spec.micro_batches == 4  # context ranks add no sequences
    pred = predict(spec, h100(8))
    assert pred.as_dict()["plan"]["context"] == 2 and pred.tokens_per_step == 8 * 32768


# --- validity ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,message", [
    (dict(cp=2, seq=4094), "seq_length=4094 is not divisible by 2 x context = 4"),
    (dict(cp=4, tp=8, sp=True, seq=48), "48/4 = 12 tokens per context rank is not divisible by tensor=8"),
    (dict(cp=2, attention_dropout=True), "attention dropout with context=2: ring attention has none"),
    (dict(cp=0), "context=0 must be at least 1"),
], ids=["seq-chunks", "sp-local-tokens", "attention-dropout", "zero"])
def test_problems_name_the_context_rules(changes, message):
    spec = llama7b(**changes)
    assert any(message in p for p in spec.problems()), spec.problems()
    assert not llama7b(cp=2).problems() and not llama7b(attention_dropout=True).problems()


def test_predict_counts_context_in_the_gpus():
    with pytest.raises(PlanError, match=r"tensor x pipeline x data x context = 1x1x1x2 = 2 GPUs, but cluster.gpus=4"):
        predict(llama7b(cp=2), h100(4))


# --- search -----------------------------------------------------------------------------------------

def test_search_needs_context_parallelism_where_no_cp1_plan_fits():
    # A million-token sequence of LLaMA-7B on 32 H100s: even TP 8 + SP with full recompute overflows.
    found = search(llama7b(seq=1 << 20, global_batch=32), h100(32))
    assert found and all(p.spec.cp > 1 for p in found)
    best = found[0]
    assert best.memory.total <= (1 - MARGIN) * best.cluster.gpu.memory_gib * GIB
    assert best.spec.gpus == 32 and best.spec.seq % (2 * best.spec.cp) == 0


def test_search_prefers_context_parallelism_at_128k():
    # At 128K tokens on 64 H100s cp = 1 fits only with full recompute; CP's plan without it is faster.
    found = search(llama7b(seq=131072, global_batch=16), h100(64))
    assert found[0].spec.cp > 1 and found[0].spec.recompute == "none"
    cp1 = [p for p in found if p.spec.cp == 1]
    assert cp1 and all(p.spec.recompute == "full" for p in cp1)
    assert found[0].tokens_per_s > cp1[0].tokens_per_s


def test_search_keeps_cp1_at_short_sequences():
    found = search(llama7b(seq=4096, global_batch=1024), h100(64))
    assert found[0].spec.cp == 1


def test_a_written_context_plan_composes_and_validates(tmp_path):
    from omegaconf import OmegaConf

    from pretrain.plan.cli import compose_training
    from pretrain.validate import validate

    best = search(llama7b(seq=131072, global_batch=16), h100(64))[0]
    plan = OmegaConf.load(write_plan(best, "llama7b_128k", str(tmp_path)))
    assert plan.context == best.spec.cp > 1
    keys = {k: plan[k] for k in plan if k not in ("defaults", "name")}
    cfg = compose_training(["model=llama-7b", "trainer=gpu", "trainer.seq_length=131072", "model.vocab_size=32000",
                            "model.max_position_embeddings=131072", "trainer.global_batch_size=16",
                            f"trainer.micro_batch_size={best.spec.micro_batch}",
                            *(f"parallel.{k}={str(v).lower()}" for k, v in keys.items())])
    validate(cfg, best.spec.gpus)


def test_the_prelaunch_check_offers_trading_data_for_context():
    spec = llama7b(dp=2, global_batch=8)
    offered = dict(_changes(spec))
    assert offered["parallel.context=2 parallel.data=1"] == spec.with_(cp=2, dp=1)
    assert not any("context" in k for k, _ in _changes(llama7b()))


# --- from a config and the command line -------------------------------------------------------------

def test_spec_from_a_context_parallel_config():
    from pretrain.plan.cli import compose_training
    from pretrain.plan.spec import from_config

    base = ["model=llama-7b", "trainer=gpu", "model.vocab_size=32000", "parallel=tp2_cp2"]
    spec = from_config(compose_training(base), {})
    assert (spec.tp, spec.cp, spec.dp, spec.gpus) == (2, 2, 1, 4)
    # The ring runs the fused Triton block kernels on GPUs whatever the attention backend.
    assert spec.attention == "flash" and spec.ring_attention == "flash" and spec.kernel == "flash"
    reference = from_config(compose_training(base), {"ring_attention": "materialized"})
    assert reference.kernel == "materialized"
    assert from_config(compose_training(base[:-1]), {}).cp == 1


def plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.plan", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_prints_context_for_a_cp2_plan():
    common = ["model=llama-7b", "trainer=gpu", "model.vocab_size=32000", "parallel=cp2", "trainer.seq_length=32768",
              "trainer.micro_batch_size=1", "trainer.global_batch_size=8", "model.attention_backend=triton",
              "cluster.gpu=H100-SXM", "cluster.gpus=2"]
    table = plan_cli(*common)
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith("plan   tp=1 cp=2 pp=1 dp=1 zero=0 ") and "cp_comm" in table.stdout
    out = json.loads(plan_cli(*common, "--json").stdout)
    assert out["plan"]["context"] == 2 and out["gpus"] == 2 and out["plan"]["attention"] == "flash"
    assert out["breakdown_s"]["cp_comm"] > 0
    wrong = plan_cli(*common[:-1], "cluster.gpus=4")
    assert wrong.returncode == 2 and "x context = 1x1x1x2 = 2 GPUs" in wrong.stderr
