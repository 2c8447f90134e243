"""``python -m pretrain.plan [training overrides] cluster.gpu=NAME cluster.gpus=N [--json] [--search]``
``python -m pretrain.plan --budget-gpu-hours H cluster.gpu=NAME [cluster.gpus=N] [--mfu F] [--json]``

Predicts, before launch, the per-GPU memory of the most loaded GPU (the first pipeline stage, or the
last when the logits outweigh it) and the step time of the composed training config on a cluster.

  cluster.gpu=NAME       A100-40GB, A100-80GB, H100-SXM, H200, B200 (or one from cluster.file)
  cluster.gpus=N         GPUs the run gets; the plan's tensor x pipeline x data x context must use them all
  cluster.file=PATH      a YAML adding or overriding GPUs (gpus: {NAME: {peak_flops: ..}}) and links
                         (gpus_per_node, nvlink_bw, network_bw, bytes/s per GPU)
  plan.KEY=VALUE         what the trainer config has no key for yet: virtual_stages, recompute
                         (none|selective|full), attention (flash|materialized), ring_attention
                         (the block kernel when parallel.context > 1: flash with attention_backend=
                         triton, else materialized), grad_bytes (2|4; default 4 when
                         trainer.precision=fp32), overlap_dp (true|false), unfused_rmsnorm (true:
                         torch-op RMSNorm, as on CPU), vocab

With --search, parallel.* and trainer.micro_batch_size are searched over (the global batch, model and
sequence stay as composed) and the five fastest plans that fit are printed; --write NAME saves the best
as a parallel-plan YAML (NAME.yaml, or --out PATH).

With --budget-gpu-hours H, the compute-optimal parameters N and tokens D for C = H x 3600 x peak x MFU
FLOPs (MFU assumed 0.40 unless --mfu; C = 6 N D), from Chinchilla's fit, the 2024 Epoch AI refit and 20
tokens per parameter (budget.py); cluster.gpus=N adds the wall-clock days. No training config is read.

FLOPs per token (forward + backward): model = 3 x (L x (2 x matmul weights per layer + 4 s a d) + 2 V h)
(Korthikanti et al. 2022: 72 B L s h^2 (1 + s/(6h) + V/(12 h L)) per step for GPT); hardware adds one
forward of each layer under full recomputation (Narayanan et al. 2021's 96 B s L h^2 (1 + s/(6h) +
V/(16 L h))) or of its attention core under selective. mfu = model FLOP/s / peak, hfu = hardware FLOP/s
/ peak, tflops_per_gpu = hardware FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import sys

from pretrain.config import compose_training
from pretrain.errors import user_errors
from pretrain.plan import Prediction, predict
from pretrain.plan.gpus import load_cluster
from pretrain.plan.memory import GIB
from pretrain.plan.spec import PlanError, from_config


def split_args(args: list[str]) -> tuple[dict, dict, list[str]]:
    """(cluster.* settings, plan.* settings, training overrides): the first two are not config keys."""
    cluster, plan, training = {}, {}, []
    for arg in args:
        key, eq, value = arg.partition("=")
        if key.startswith("cluster.") and eq:
            cluster[key[len("cluster."):]] = value
        elif key.startswith("plan.") and eq:
            plan[key[len("plan."):]] = value
        else:
            training.append(arg)
    return cluster, plan, training


def table(pred: Prediction) -> str:
    d = pred.as_dict()
    p, mem, br = d["plan"], d["memory_gib"], d["breakdown_s"]
    lines = [
        f"plan   tp={p['tensor']} cp={p['context']} pp={p['pipeline']} dp={p['data']} zero={p['zero_stage']} "
        f"sp={'on' if p['sequence_parallel'] else 'off'} recompute={p['recompute']} v={p['virtual_stages']} "
        f"micro={p['micro_batch_size']} x {p['micro_batches']} (global {p['global_batch_size']})",
        f"on     {d['gpus']} x {d['gpu']}   model {d['params'] / 1e9:.2f}B parameters",
        f"memory {mem['total']:.2f} GiB of {d['device_memory_gib']:.1f} ({d['memory_stage']} stage; "
        f"{'fits' if d['fits'] else 'DOES NOT FIT'})",
        *(f"  {k:<12}{mem[k]:9.2f} GiB" for k in ("weights", "grads", "optimizer", "activations", "logits", "other")),
        f"step   {d['step_time_s']:.3f} s   {d['tokens_per_s']:,.0f} tokens/s ({d['tokens_per_s_per_gpu']:,.0f} per GPU)",
        f"       {d['tflops_per_gpu']:.1f} TFLOP/s per GPU, MFU {d['mfu']:.1%}, HFU {d['hfu']:.1%}",
        *(f"  {k:<12}{v:9.3f} s" for k, v in br.items()),
    ]
    return "\n".join(lines)


def plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--search", action="store_true", help="rank the parallel plans that fit; print the top 5")
    parser.add_argument("--top", type=int, default=5, help="how many plans --search prints")
    parser.add_argument("--write", metavar="NAME", help="with --search: write the best plan as parallel plan NAME")
    parser.add_argument("--out", metavar="PATH", help="where --write puts it: a file, or a folder (default ./NAME.yaml)")
    parser.add_argument("--margin", type=float, default=None,
                        help="fraction of device memory --search leaves free (default 0.05)")
    parser.add_argument("--budget-gpu-hours", type=float, metavar="H",
                        help="propose compute-optimal parameters and tokens for H GPU-hours")
    parser.add_argument("--mfu", type=float, default=None, help="with --budget-gpu-hours: assumed MFU (default 0.40)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    parser.add_argument("overrides", nargs="*", help="training overrides, cluster.KEY=VALUE, plan.KEY=VALUE")
    args = parser.parse_intermixed_args(argv)
    with user_errors("plan", debug=args.debug):
        return run(args)


def run(args) -> int:
    cluster_settings, extra, training = split_args(args.overrides)
    if args.budget_gpu_hours is not None:
        return run_budget(args, cluster_settings, extra, training)
    if args.mfu is not None:
        raise PlanError("--mfu goes with --budget-gpu-hours")
    cluster = load_cluster(cluster_settings)
    cfg = compose_training(training)
    spec = from_config(cfg, extra)
    if args.write and not args.search:
        raise PlanError("--write needs --search (it writes the best plan found)")
    if args.search:
        from pretrain.plan.search import MARGIN, search, write_plan

        found = search(spec, cluster, MARGIN if args.margin is None else args.margin)
        if not found:
            raise PlanError(f"no plan fits {cluster.gpus} x {cluster.gpu.name} ({cluster.gpu.memory_gib:.0f} GiB) for "
                            f"{cfg.model.name} at global batch {spec.global_batch} x {spec.seq} tokens: add GPUs, "
                            "use a GPU with more memory, or shorten the sequence")
        top = found[: args.top]
        if args.json:
            print(json.dumps([p.as_dict() for p in top], indent=2))
        else:
            print(f"{'rank':<5}{'tp':>3}{'cp':>4}{'pp':>4}{'dp':>5}{'zero':>5}{'sp':>4}{'recompute':>11}{'v':>3}"
                  f"{'micro':>6}{'GiB':>8}{'step s':>9}{'tokens/s':>12}{'MFU':>7}")
            for i, p in enumerate(top, 1):
                s = p.spec
                print(f"{i:<5}{s.tp:>3}{s.cp:>4}{s.pp:>4}{s.dp:>5}{s.zero:>5}{'on' if s.sp else 'off':>4}"
                      f"{s.recompute:>11}{s.virtual_stages:>3}{s.micro_batch:>6}{p.memory.total / GIB:>8.1f}"
                      f"{p.time.total:>9.3f}{p.tokens_per_s:>12,.0f}{p.mfu:>7.1%}")
        if args.write:
            path = write_plan(top[0], args.write, args.out)
            print(f"wrote {path}: use it with parallel={args.write} trainer.micro_batch_size={top[0].spec.micro_batch}"
                  " (copy it into pretrain/conf/parallel/)", file=sys.stderr)
        return 0
    pred = predict(spec, cluster)
    print(json.dumps(pred.as_dict(), indent=2) if args.json else table(pred))
    if not pred.fits:
        print(f"plan: warning: {pred.memory.total / GIB:.1f} GiB does not fit the {cluster.gpu.memory_gib:.1f} GiB of a "
              f"{cluster.gpu.name}; try --search", file=sys.stderr)
    return 0


def run_budget(args, cluster_settings: dict, extra: dict, training: list[str]) -> int:
    from pretrain.plan.budget import ASSUMED_MFU, budget, table as budget_table

    if args.search or args.write or extra or training:
        raise PlanError("--budget-gpu-hours takes cluster.gpu=NAME [cluster.gpus=N] [--mfu F] only (got "
                        f"{' '.join(['--search'] * args.search + [a for a in args.overrides if not a.startswith('cluster.')])})")
    given = bool(cluster_settings.get("gpus"))
    cluster = load_cluster({"gpus": 1, **cluster_settings})
    result = budget(args.budget_gpu_hours, cluster, ASSUMED_MFU if args.mfu is None else args.mfu, given)
    print(json.dumps(result, indent=2) if args.json else budget_table(result))
    return 0


def main(argv=None) -> int:
    return plan(sys.argv[1:] if argv is None else argv)
