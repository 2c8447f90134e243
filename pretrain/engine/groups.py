"""Process groups: the single place that creates them and tells DeepSpeed about them.

megatron-core's ``parallel_state`` (order tp-cp-ep-dp-pp) and DeepSpeed's
``PipeModelDataParallelTopology`` (axes pipe, data, model) lay ranks out identically: TP ranks
are adjacent, then CP, then DP, then PP. DeepSpeed is not told about context parallelism: its data
axis is megatron-core's data x context group (CP ranks hold the same weights and their gradients
are averaged like DP's), so its ZeRO partitioning, gradient reduction and pipeline grid are those
of ``dp x cp`` ranks. ``check_agreement`` verifies at start-up that both libraries built the same
groups.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state

from pretrain.engine import compat
from pretrain.environment import adopt_slurm_tasks, world_size_from_env  # noqa: F401 (re-exported)
from pretrain.config import ParallelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: ParallelConfig) -> None:
    """Create the default group and megatron-core's TP/PP/DP groups. Every rank calls this once."""
    compat.apply()
    if world_size_from_env() == 1 and "MASTER_ADDR" not in os.environ:
        # A plain `python -m pretrain.train` is a one-process job; DeepSpeed still wants a group.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if compat.cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        import deepspeed

        timeout = timedelta(minutes=parallel.timeout_minutes)
        deepspeed.init_distributed(dist_backend=compat.dist_backend(), verbose=False, timeout=timeout)
    if parallel_state.model_parallel_is_initialized():  # an earlier job in this process
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor, pipeline_model_parallel_size=parallel.pipeline,
        context_parallel_size=parallel.context, distributed_timeout_minutes=parallel.timeout_minutes,
    )
    check_agreement(parallel)


def shutdown(keep_default_group: bool = False) -> None:
    """Tear down the groups; ``keep_default_group`` leaves the world group for another job in this process."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        if not keep_default_group:
            dist.destroy_process_group()


def topology(parallel: ParallelConfig) -> PipeModelDataParallelTopology:
    """DeepSpeed's grid; its data axis is data x context (see the module docstring)."""
    return PipeModelDataParallelTopology(num_pp=parallel.pipeline, num_mp=parallel.tensor,
                                         num_dp=parallel.data * parallel.context)


class GroupMismatch(RuntimeError):
    """megatron-core and DeepSpeed disagree on which ranks form a group: TP layers and ZeRO would
    then combine different ranks' pieces. A bug, not a configuration error."""


def check_agreement(parallel: ParallelConfig) -> None:
    """This rank's TP, data x context and pipeline groups, as megatron-core built them, equal the
    lines of DeepSpeed's topology through this rank. Every rank checks its own; no communication."""
    topo = topology(parallel)
    rank = dist.get_rank()
    coord = topo.get_coord(rank)
    ours = {
        "model": parallel_state.get_tensor_model_parallel_group(),
        "data": parallel_state.get_data_parallel_group(with_context_parallel=True),
        "pipe": parallel_state.get_pipeline_model_parallel_group(),
    }
    for axis, group in ours.items():
        fixed = {a: getattr(coord, a) for a in topo.get_axis_names() if a != axis}
        theirs = sorted(topo.filter_match(**fixed))
        mine = sorted(dist.get_process_group_ranks(group))
        if mine != theirs:
            raise GroupMismatch(f"rank {rank}: megatron-core's {axis} group is {mine} but DeepSpeed's topology "
                                f"{topo} puts {theirs} there")
    cp, data = parallel_state.get_context_parallel_global_ranks(), dist.get_process_group_ranks(ours["data"])
    if len(cp) != parallel.context or not set(cp) <= set(data):
        raise GroupMismatch(f"rank {rank}: context-parallel group {sorted(cp)} is not {parallel.context} ranks "
                            f"inside the data x context group {sorted(data)}")


def data_group():
    """The ranks that hold the same weights: data x context (gradients and losses are averaged over it)."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


@dataclass(frozen=True)
class Ranks:
    """This process's coordinates in the grid."""

    rank: int
    dp: int
    dp_size: int

    @property
    def logs(self) -> bool:
        """Rank 0 writes files and prints; losses reach it on every layout."""
        return self.rank == 0


def ranks() -> Ranks:
    return Ranks(
        rank=dist.get_rank(),
        dp=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )


class MegatronMPU:
    """The model-parallel unit DeepSpeed expects (``mpu=``), over megatron-core's groups (pp == 1).

    ZeRO then partitions over the data-parallel group only, and the global gradient norm counts
    TP-split parameters on every TP rank and replicated ones once.
    """

    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    # DeepSpeed's data parallelism is data x context: ZeRO partitions and averages over both.
    get_data_parallel_rank = staticmethod(partial(parallel_state.get_data_parallel_rank, with_context_parallel=True))
    get_data_parallel_world_size = staticmethod(
        partial(parallel_state.get_data_parallel_world_size, with_context_parallel=True))
    get_data_parallel_group = staticmethod(data_group)
    # Without a pipeline, the model-parallel group is the TP group.
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
