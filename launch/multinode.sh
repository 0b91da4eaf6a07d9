#!/usr/bin/env bash
# Several machines, DeepSpeed's own launcher and a hostfile ("host slots=N" per line). Two ways to start:
#
#   ssh mode (one command, on the first host; needs password-less ssh and pdsh or ssh to every host):
#     launch/multinode.sh HOSTFILE CONFIG [overrides]
#   --no_ssh mode (run the same command on every host, each with its own NODE_RANK; no ssh needed):
#     NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multinode.sh HOSTFILE CONFIG [overrides]   # on host 0
#     NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multinode.sh HOSTFILE CONFIG [overrides]   # on host 1
#
# Every host needs the same code, config, teacher, prepared data and cache paths (a shared filesystem), and an
# MLflow server reachable from rank 0 (launch/mlflow-server.sh; set mlflow.tracking_uri or MLFLOW_TRACKING_URI).
# Works from any directory without activating .venv; relative paths inside configs are read from the repository root.
# env: STAGE (train | cache, default train), NODE_RANK, MASTER_ADDR, MASTER_PORT (default 29500), DISTILL.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
hostfile=$(absolute "${1:?usage: launch/multinode.sh HOSTFILE CONFIG [overrides]}")
config=$(absolute "${2:?usage: launch/multinode.sh HOSTFILE CONFIG [overrides]}"); shift 2
need deepspeed; need "${DISTILL:-distill}"
cd "$repo"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
args=(--hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}")
if [ -n "${NODE_RANK:-}" ]; then
  args+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the address of host 0}")
elif [ -n "${MASTER_ADDR:-}" ]; then
  args+=(--master_addr "$MASTER_ADDR")
fi
exec deepspeed "${args[@]}" "$(command -v "${DISTILL:-distill}")" "${STAGE:-train}" "$config" "$@"
