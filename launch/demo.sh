#!/usr/bin/env bash
# The main job on the embedded default: generates the synthetic CIR world and runs the pipeline on it (CPU is fine).
# Extra arguments go to recall_jax.main, e.g. `bash launch/demo.sh --workdir runs/other`.
source "$(dirname "$0")/env.sh" requirements.txt
# A finished teach (F) is kept in the cache and reused by any later run with the same recipe, world and code.
exec python -m recall_jax.main --config configs/demo.py --config.teach.cache_dir="${RECALL_JAX_CACHE:-$HOME/.cache/recall_jax}/teach" --workdir "${WORKDIR:-runs/demo}" "$@"
