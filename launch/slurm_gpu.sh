#!/usr/bin/env bash
# Multi-node GPU launch with SLURM: one process per node, each driving all its GPUs; jax.distributed.initialize
# picks up the SLURM environment (recall_jax.parallel.maybe_initialize_distributed).
#
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 --cpus-per-task=32 launch/slurm_gpu.sh \
#     configs/cirr_qwen25vl_7b.py runs/cirr_7b --config.model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct \
#     --config.data.root=/data/CIRR
#
# The workdir must be on a filesystem every node sees (checkpoints are written collectively by Orbax).
#SBATCH --job-name=recall_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
CONFIG="${1:?usage: slurm_gpu.sh CONFIG WORKDIR [flags...]}"
WORKDIR="${2:?usage: slurm_gpu.sh CONFIG WORKDIR [flags...]}"
shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# XLA flags that matter for this workload on H100/H200: the latency-hiding scheduler overlaps the all-gathers of
# GradCache's target embeddings with compute. Attention (vision windows and text) is jax.nn.dot_product_attention's
# XLA implementation, its default; cuDNN attention is not requested.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
srun --kill-on-bad-exit=1 "${RECALL_PYTHON:-.venv/bin/python}" -m recall_jax.main \
  --config "$CONFIG" --workdir "$WORKDIR" "$@"
