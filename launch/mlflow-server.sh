#!/usr/bin/env bash
# An MLflow tracking server for multi-node runs (rank 0 of every job logs to it).
#
# usage: launch/mlflow-server.sh [BACKEND_URI] [ARTIFACT_ROOT]
#   launch/mlflow-server.sh                                              # sqlite:///mlflow.db, ./mlartifacts
#   launch/mlflow-server.sh postgresql://user:pw@db/mlflow /shared/mlartifacts
# env: HOST (default 127.0.0.1: only this machine; set 0.0.0.0 to let other nodes in), PORT (default 5000).
# Then on the training nodes: export MLFLOW_TRACKING_URI=http://<this host>:$PORT
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
backend=${1:-sqlite:///mlflow.db}
artifacts=${2:-./mlartifacts}
mlflow=${MLFLOW:-mlflow}
need "$mlflow"
exec "$mlflow" server --backend-store-uri "$backend" --artifacts-destination "$artifacts" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}"
