"""``model.compile``: each block under torch.compile (inductor on CPU) trains as the eager model does,
at every layout, and the first forward names its graph breaks."""

import logging
import math
import re

import pytest
import torch

from harness import FAST, run_jobs, run_train

COMMON = FAST + [
    "data=synthetic", "trainer.max_steps=10", "trainer.seq_length=32", "trainer.global_batch_size=8",
    "optim.warmup_tokens=0", "trainer.seed=3",
    # GPT-3's banded attention on odd layers: two kinds of block, so two graphs.
    "model=tiny-gpt", "model.hidden_size=64", "model.local_window=8", "model.local_attention_layers=odd",
    # Dropout on: compiled blocks draw the eager model's masks (per TP rank, megatron-core's tracker).
    "model.hidden_dropout=0.1", "model.attention_dropout=0.1",
]
LAYOUTS = {
    "single": (1, ["parallel=single", "trainer.micro_batch_size=8"]),
    "tp2": (2, ["parallel=tp2", "trainer.micro_batch_size=8"]),
    "pp2": (2, ["parallel=pp2", "trainer.micro_batch_size=4"]),
    "dp2_zero2": (2, ["parallel=dp2_zero2", "trainer.micro_batch_size=4"]),
    "tp2_pp2": (4, ["parallel=tp2_pp2", "trainer.micro_batch_size=4"]),
}
SELECTIVE = ["parallel.activation_checkpointing=selective"]
_results = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    def get(world: int) -> dict:
        if world not in _results:
            jobs = {}
            for layout, (size, args) in LAYOUTS.items():
                if size == world:
                    jobs[f"{layout}-eager"] = COMMON + args + ["model.compile=false"]
                    jobs[f"{layout}-compiled"] = COMMON + args + ["model.compile=true"]
            if world == 1:  # selective recomputation inside a compiled block (its own autograd.Function)
                selective = COMMON + LAYOUTS["single"][1] + SELECTIVE
                jobs["selective-eager"] = selective + ["model.compile=false"]
                jobs["selective-compiled"] = selective + ["model.compile=true"]
            workdir = tmp_path_factory.mktemp(f"compile{world}")
            _results[world] = (run_jobs(world, jobs, workdir, timeout=1500), workdir)
        return _results[world]

    return get


def _match(eager, compiled, what):
    assert len(eager) == len(compiled) == 10
    for key in ("loss", "grad_norm"):
        for step, (got, want) in enumerate(zip((r[key] for r in compiled), (r[key] for r in eager)), 1):
            assert math.isfinite(got) and abs(got - want) <= 1e-5 * abs(want), \
                f"{what} {key} step {step}: compiled {got} vs eager {want}"


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_blocks_match_the_eager_model_over_10_fp32_steps(results, layout):
    records, _ = results(LAYOUTS[layout][0])
    _match(records[f"{layout}-eager"], records[f"{layout}-compiled"], layout)


@pytest.mark.distributed
def test_selective_recomputation_inside_compiled_blocks_matches_eager(results):
    """The recomputed attention core redraws the forward's dropout masks inside the compiled block."""
    records, _ = results(1)
    _match(records["selective-eager"], records["selective-compiled"], "selective")


@pytest.mark.distributed
def test_graph_breaks_under_tensor_and_sequence_parallelism_are_named_in_the_debug_log(tmp_path):
    """Through the entry point at tp2 with sequence parallelism, DEBUG on for the compile logger:
    megatron-core's TP linears break the graph (asynchronous collectives); train.log counts the breaks
    of the first forward and names every reason, with counts that add up."""
    run_train(COMMON + LAYOUTS["tp2"][1] + ["parallel=tp2_sp", "model.compile=true", "trainer.max_steps=1",
                                            "hydra.verbose=pretrain.model.compile", f"hydra.run.dir={tmp_path}/run"],
              tmp_path, nproc=2)
    log = (tmp_path / "run" / "train.log").read_text()
    counted = re.search(r"model\.compile: 4 blocks compiled; (\d+) graph breaks in the first forward", log)
    assert counted, log[-3000:]
    named = [int(n) for n in re.findall(r"\[DEBUG\] - graph break \((\d+) x\): \S", log)]
    # Both TP ranks log their own first forward, into the one train.log.
    assert int(counted.group(1)) > 0 and sum(named) == 2 * int(counted.group(1)), (counted.group(0), named)
    assert "async_op=True" in log  # the sequence-parallel all-gather, named


def test_graph_breaks_of_the_first_forward_are_named_at_debug(caplog):
    from pretrain.model import compile as regional

    class Breaks(torch.nn.Module):
        def forward(self, x):
            x = x * 2
            torch._dynamo.graph_break()
            return x + 1

    top = torch.nn.Sequential(Breaks())
    top[0].compile(backend="eager")
    regional._report_graph_breaks_after_first_forward(top, 1)
    with caplog.at_level(logging.DEBUG, logger="pretrain.model.compile"):
        assert torch.equal(top(torch.ones(2)), torch.full((2,), 3.0))
        top(torch.ones(2))  # reported once, after the first forward only
    ours = [r for r in caplog.records if r.name == "pretrain.model.compile"]
    infos = [r.getMessage() for r in ours if r.levelno == logging.INFO]
    debugs = [r.getMessage() for r in ours if r.levelno == logging.DEBUG]
    assert infos == ["model.compile: 1 blocks compiled; 1 graph breaks in the first forward "
                     "(reasons at DEBUG, logger pretrain.model.compile)"], infos
    assert len(debugs) == 1 and "graph_break" in debugs[0].lower(), debugs


def test_null_compiles_only_with_cuda():
    from pretrain.model.compile import wanted

    assert wanted(True) and not wanted(False)
    assert wanted(None) == torch.cuda.is_available()
