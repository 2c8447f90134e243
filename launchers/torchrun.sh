#!/usr/bin/env bash
# Launch training with torchrun on one node or many (c10d rendezvous). Hydra overrides pass through.
#
#   launchers/torchrun.sh parallel=tp2_pp2                         # one node, all its GPUs (or 1 CPU process)
#   NPROC_PER_NODE=4 launchers/torchrun.sh parallel=tp2_pp2 data=tiny   # 4 CPU processes with gloo
#   NNODES=4 RDZV_ENDPOINT=node001:29500 launchers/torchrun.sh model=gpt3-xl parallel=tp8_pp4_dp4_zero1 trainer=gpu
# On Slurm, use `python -m pretrain.launch slurm ...`, which renders and submits the batch script.
#     (run the same line on every node; the endpoint is any one node's address)
set -euo pipefail
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-pretrain}}

if [ "$NNODES" = 1 ] && [ "$RDZV_ENDPOINT" = 127.0.0.1:29500 ]; then
    rdzv=(--standalone)  # picks a free port: several single-node jobs can share a machine
else
    rdzv=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID")
fi
# USR1 (a scheduler's "time is nearly up") reaches the ranks too: they finish the step, checkpoint
# and exit; relaunching resumes. SIGTERM is handled the same way.
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${rdzv[@]}" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 -m pretrain.train "$@"
