#!/usr/bin/env bash
# One machine, NPROC processes (GPUs, or CPU processes on gloo), DeepSpeed's own launcher. Works from any directory
# without activating .venv; relative paths inside configs are read from the repository root.
#
# usage: launch/local.sh NPROC CONFIG [section.key=value ...]
#   STAGE=cache launch/local.sh 2 configs/demo.yaml     # the cache stage, one process per rank
#   launch/local.sh 2 configs/demo.yaml train.max_steps=50
# env: STAGE (train | cache, default train), MASTER_PORT (default 29500), DISTILL (the distill executable).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
nproc=${1:?usage: launch/local.sh NPROC CONFIG [overrides]}
config=$(absolute "${2:?usage: launch/local.sh NPROC CONFIG [overrides]}"); shift 2
need deepspeed; need "${DISTILL:-distill}"
cd "$repo"
# One BLAS thread per process: on a CPU, several processes each starting one thread per core are several times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec deepspeed --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" \
  "$(command -v "${DISTILL:-distill}")" "${STAGE:-train}" "$config" "$@"
