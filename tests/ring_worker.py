"""Runs ring attention on gloo process groups for tests/test_ring_attention.py.

    python tests/ring_worker.py WORLD GROUPS INPUTS OUTPUT

spawns WORLD processes; GROUPS is a JSON list of CP groups (lists of global ranks) covering them.
INPUTS (torch.save) maps case name -> {q, k, v, grad_out [full sequence], segments or None, window,
backend}. Every CP group runs every case on its shards; each group's first rank gathers the group's
local outputs and gradients back into full-sequence order and writes OUTPUT/<case>.g<group>.pt with
{out, dq, dk, dv, calls, plans, kernel_backend}: per CP rank, the number of block kernel calls
(forward, backward) and ring_plan's (computed, skipped); pretrain_kernels' backend in force. Under
TRITON_INTERPRET=1 the workers select the Triton backend before the first kernel call.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pretrain.model.ring_attention as ra  # noqa: E402
from harness import free_port  # noqa: E402


def _count_block_calls(counts: dict) -> None:
    """Wrap the block kernels ring_attention looks up, counting calls into ``counts``."""
    build = ra._block_ops

    def counting(*args):
        ops = build(*args)

        def forward(*a):
            counts["forward"] += 1
            return ops.forward(*a)

        def backward(*a):
            counts["backward"] += 1
            return ops.backward(*a)

        return ra._BlockOps(forward, backward)

    ra._block_ops = counting


def _gather(t: torch.Tensor, group) -> list:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _run(rank: int, world: int, port: int, groups: list, inputs: str, output: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    handles = [dist.new_group(g) for g in groups]  # every rank creates every group, in the same order
    index = next(i for i, g in enumerate(groups) if rank in g)
    group, members = handles[index], groups[index]
    cp_size, cp_rank = len(members), members.index(rank)
    import pretrain_kernels  # after TRITON_INTERPRET is in the environment (the test sets it for us)

    if os.environ.get("TRITON_INTERPRET") == "1":
        pretrain_kernels.set_backend("triton")
    counts = {"forward": 0, "backward": 0}
    _count_block_calls(counts)
    cases = torch.load(inputs)
    for name, case in cases.items():
        counts.update(forward=0, backward=0)
        q, k, v = (ra.shard_sequence(case[n], 2, cp_size, cp_rank).requires_grad_() for n in ("q", "k", "v"))
        grad_out = ra.shard_sequence(case["grad_out"], 2, cp_size, cp_rank)
        segments = case["segments"]
        segments = None if segments is None else ra.shard_sequence(segments, 1, cp_size, cp_rank)
        out = ra.ring_attention(q, k, v, group=group, window=case["window"], segments=segments,
                                backend=case["backend"])
        out.backward(grad_out)
        plan = ra.ring_plan(case["q"].shape[2], cp_size, cp_rank, case["window"])
        stats = torch.tensor([counts["forward"], counts["backward"], plan.computed, plan.skipped])
        gathered = {n: _gather(t.detach(), group) for n, t in (("out", out), ("dq", q.grad), ("dk", k.grad),
                                                                ("dv", v.grad))}
        all_stats = _gather(stats, group)
        if cp_rank == 0:
            result = {n: ra.unshard_sequence(parts, 2) for n, parts in gathered.items()}
            result["calls"] = [s[:2].tolist() for s in all_stats]
            result["plans"] = [s[2:].tolist() for s in all_stats]
            result["kernel_backend"] = pretrain_kernels.get_backend()
            torch.save(result, Path(output) / f"{name}.g{index}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    world, groups, inputs, output = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    mp.spawn(_run, args=(world, free_port(), groups, inputs, output), nprocs=world)
