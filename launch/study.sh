#!/usr/bin/env bash
# The ablation study on the synthetic world: 3 training seeds x the paper's ablation rows; writes study.json,
# study.md and study.png into the workdir. Extra arguments go to recall_jax.study, e.g. `'--config.study.seeds=(0,)'`.
source "$(dirname "$0")/env.sh" requirements.txt
# A finished teach (F) is kept in the cache and reused by any later run with the same recipe, world and code.
exec python -m recall_jax.study --config configs/study.py --config.teach.cache_dir="${RECALL_JAX_CACHE:-$HOME/.cache/recall_jax}/teach" --workdir "${WORKDIR:-runs/study}" "$@"
