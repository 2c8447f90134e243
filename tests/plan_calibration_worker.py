"""Measure per-rank model-state and activation bytes of real engines, for the planner's calibration test.

    torchrun --nproc_per_node N tests/plan_calibration_worker.py OUT.json JOBS.json WORKDIR

JOBS.json maps a job name to its Hydra overrides; every job is built (``build_run``) in the one launched
process group. Per job and rank it writes (rank 0 gathers them into OUT.json):

- ``weights``: bytes of the parameters this rank holds: the module's parameters, or under ZeRO-3 the
  partitions (``ds_tensor``) it owns; unique storages.
- ``optimizer``: the optimizer's state (Adam's exp_avg, exp_avg_sq) plus the fp32 master partitions a
  ZeRO optimizer keeps beside the module's weights (``single_partition_of_fp32_groups`` for stages 1/2,
  ``fp32_partitioned_groups_flat`` for stage 3), measured after one training step (Adam state exists).
- ``grads``: the peak of the gradient bytes the rank holds over the step, sampled after every
  parameter's gradient accumulates (post-accumulate-grad hooks, which run after DeepSpeed's own) and
  when the ZeRO optimizer steps: the module's ``.grad`` tensors, the gradients of the fp32 partitions
  and DeepSpeed's gradient partitions (``averaged_gradients``, stage 3's flat partition buffer), each
  counted by the bytes it covers (not the whole flat buffer it may view; overlaps once). That is the planner's definition: the
  full gradient without ZeRO-2 (DeepSpeed's stage 1 holds it whole until the boundary's reduction),
  the rank's partition with ZeRO >= 2, where gradients are sampled at the step only: DeepSpeed moves
  each into a reduction bucket as it is produced (``reduce_bucket_size`` elements, here more than the
  whole model, so the bucket holds them all until backward ends); a fixed buffer, not counted.
- ``activations``: the peak of the bytes saved for backward over one micro-batch's forward and backward
  (a full step for pipelines), unique storages, parameters excluded: ``saved_tensors_hooks`` see what
  autograd saves; under full recompute (torch's non-reentrant checkpoint hides the block's own saved
  tensors behind its hook) the inputs of the checkpointed blocks are added, as the checkpoint holds them.
  The working set of the one block recomputed during backward is not in this count (see the test).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from pretrain.config import register_configs, typed
from pretrain.engine import groups
from pretrain.model.layers import Block
from pretrain.train.build import build_run
from pretrain.validate import validate

CONF = str(Path(__file__).resolve().parents[1] / "pretrain" / "conf")


def storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def unique_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and torch.is_tensor(t) and t.numel() > 0:
            ptr, n = storage(t)
            seen[ptr] = max(seen.get(ptr, 0), n)
    return sum(seen.values())


def tensor_bytes(tensors) -> int:
    """Bytes the tensors cover, overlaps once (a gradient partition may view a larger flat buffer, and
    per-parameter gradients views of a partition)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                   for t in tensors if t is not None and torch.is_tensor(t) and t.numel() > 0)
    total, end = 0, 0
    for lo, hi in spans:
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def inner_optimizer(ds_optimizer):
    """The torch optimizer under DeepSpeed's wrappers."""
    opt = ds_optimizer
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def master_partitions(ds_optimizer) -> list:
    out = []
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        out += list(getattr(ds_optimizer, attr, None) or [])
    return out


def grad_tensors(module, ds_optimizer) -> list:
    grads = [p.grad for p in module.parameters()]
    grads += [getattr(t, "grad", None) for t in master_partitions(ds_optimizer)]
    value = getattr(ds_optimizer, "averaged_gradients", None)  # {group: [partition grads]}
    for v in (value.values() if isinstance(value, dict) else value or []):
        grads += list(v or [])
    grads.append(getattr(ds_optimizer, "grad_partitions_flat_buffer", None))  # stage 3
    return grads


class SavedBytes:
    """Peak bytes of the unique storages autograd holds for backward (parameters excluded)."""

    def __init__(self, params):
        self.params = params
        self.live = {}  # storage ptr -> [references, bytes]
        self.now = self.peak = 0

    def add(self, t: torch.Tensor):
        ptr, n = storage(t)
        entry = self.live.setdefault(ptr, [0, n])
        if entry[0] == 0:
            self.now += n
            self.peak = max(self.peak, self.now)
        entry[0] += 1
        return ptr

    def drop(self, ptr: int):
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[ptr]

    def pack(self, t: torch.Tensor):
        if t.numel() == 0 or storage(t)[0] in {storage(p)[0] for p in self.params()}:
            return _Held(t, None, self)
        return _Held(t, self.add(t), self)

    @staticmethod
    def unpack(held):
        return held.t


class _Held:
    def __init__(self, t, ptr, owner):
        self.t, self.ptr, self.owner = t, ptr, owner

    def __del__(self):
        if self.ptr is not None:
            self.owner.drop(self.ptr)


def measure(run, cfg) -> dict:
    engine, ds = run.engine, run.engine.ds
    module = ds.module
    opt = inner_optimizer(engine.optimizer)
    accum = cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * cfg.parallel.data)
    at_step = {}

    step = engine.optimizer.step

    def sample(*_):
        at_step["grads"] = max(at_step.get("grads", 0), tensor_bytes(grad_tensors(module, engine.optimizer)))

    # ZeRO >= 2 moves each gradient into a reduction bucket as it is produced: the bucket is a fixed
    # buffer (reduce_bucket_size), not a per-parameter term, so only the step's partitions count.
    hooks = [] if engine.zero_stage >= 2 else \
        [p.register_post_accumulate_grad_hook(sample) for p in module.parameters() if p.requires_grad]

    def measured_step(*args, **kwargs):  # the accumulation boundary, before any group steps
        sample()
        return step(*args, **kwargs)

    engine.optimizer.step = measured_step
    batches = run.batches(run.train_data, 0, cfg.trainer.global_batch_size)
    engine.train_step(batches)  # Adam state now exists
    engine.optimizer.step = step
    for h in hooks:
        h.remove()
    zero3 = engine.zero_stage == 3
    weights = unique_bytes([p.ds_tensor if zero3 else p for p in module.parameters()])
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    optimizer = unique_bytes(state + master_partitions(engine.optimizer))

    saved = SavedBytes(lambda: list(module.parameters()))
    handles = []
    if cfg.parallel.activation_checkpointing != "none":
        def hold_input(block, args):
            if block.activation_checkpoint and torch.is_grad_enabled():
                ptr = saved.add(args[0])
                # The checkpoint keeps the input until the block's backward: release with the graph.
                args[0].grad_fn and args[0].grad_fn.register_hook(lambda *a, p=ptr: saved.drop(p))
        handles = [m.register_forward_pre_hook(hold_input) for m in module.modules() if isinstance(m, Block)]
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        if engine.pipeline:
            engine.train_step(batches)
        else:
            ds.train()
            tokens, labels = batches[0]
            loss = ds(tokens, labels)
            ds.backward(loss)
            ds.step() if accum == 1 else None
    for h in handles:
        h.remove()
    return {"weights": weights, "grads": at_step.get("grads", 0), "optimizer": optimizer,
            "activations": saved.peak, "zero_stage": engine.zero_stage,
            "stage": getattr(ds, "stage_id", 0), "stages": getattr(ds, "num_stages", 1),
            "params": sum(p.ds_numel if zero3 else p.numel() for p in module.parameters())}


def main(out: str, jobs_file: str, workdir: str) -> None:
    jobs = json.loads(Path(jobs_file).read_text())
    register_configs()
    results = {}
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for name, overrides in jobs.items():
            cfg = compose("config", overrides=overrides)
            world = cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.data
            validate(cfg, world)
            run = build_run(typed(cfg), Path(workdir) / name, logging_on=False)
            mine = measure(run, cfg)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            results[name] = gathered
            groups.shutdown(keep_default_group=True)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
