#!/usr/bin/env bash
# Several JAX processes on one machine (CPU collectives), e.g. to try multi-host code paths without a cluster:
#   NUM_PROCESSES=2 bash launch/local_multiprocess.sh configs/demo.py runs/mp --config.world.scale=tiny
set -euo pipefail
source "$(dirname "$0")/env.sh" requirements.txt
CONFIG="${1:?usage: local_multiprocess.sh CONFIG WORKDIR [flags...]}"
WORKDIR="${2:?}"
shift 2
N="${NUM_PROCESSES:-2}"
PORT="${PORT:-$((20000 + RANDOM % 20000))}"
pids=()
for ((i = 0; i < N; i++)); do
  RECALL_COORDINATOR="127.0.0.1:$PORT" RECALL_NUM_PROCESSES="$N" RECALL_PROCESS_ID="$i" \
    python -m recall_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit "$status"
