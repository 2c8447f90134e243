#!/usr/bin/env bash
# Launch training with DeepSpeed's launcher over the hosts in a hostfile ("host slots=N" per line).
#
#   HOSTFILE=launchers/hostfile.example launchers/deepspeed.sh model=gpt3-xl parallel=tp8_pp4_dp4_zero1 trainer=gpu
#   launchers/deepspeed.sh --num_gpus 2 -- parallel=tp2 data=tiny      # one host, no hostfile
set -euo pipefail
ds_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ] && [[ "$1" == --* ]]; do ds_args+=("$1" "$2"); shift 2; done
[ "${1:-}" = "--" ] && shift
if [ -n "${HOSTFILE:-}" ]; then
    ds_args+=(--hostfile "$HOSTFILE")
fi
# --no_local_rank: ranks read LOCAL_RANK from the environment; a --local_rank argument would
# reach Hydra as an unknown override.
exec deepspeed "${ds_args[@]}" --no_local_rank --module pretrain.train "$@"
