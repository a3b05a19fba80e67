#!/usr/bin/env bash
# The main job on the embedded default: generates the synthetic CIR world and runs the pipeline on it (CPU is fine).
# Extra arguments go to recall_jax.main, e.g. `bash launch/demo.sh --workdir runs/other`.
source "$(dirname "$0")/env.sh" requirements.txt
exec python -m recall_jax.main --config configs/demo.py --workdir "${WORKDIR:-runs/demo}" "$@"
