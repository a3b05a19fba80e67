#!/usr/bin/env bash
# TPU pod launch: the same command on every worker; JAX finds the pod topology itself.
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE configs/cirr_qwen25vl_7b.py gs://bucket/runs/cirr_7b \
#     --config.model.checkpoint=/mnt/ckpt/Qwen2.5-VL-7B-Instruct --config.data.root=/mnt/data/CIRR
#
# Expects the repository at ~/recall_jax on every worker, set up once there with
#   source launch/env.sh requirements.txt && pip install "jax[tpu]==0.10.2" gcsfs
# A gs:// workdir (and gs:// data.root / model.checkpoint) works: every path goes through etils.epath
# (recall_jax/files.py), which reads and writes buckets through gcsfs, with the TPU VM's service account; Orbax
# writes the checkpoints through tensorstore's own GCS driver. Without gcsfs the first write into the bucket fails.
# Mesh: e.g. --config.mesh.shape="(-1,4,1)" to shard the base weights over fsdp on v5e-16 and larger.
set -euo pipefail
TPU="${1:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}"
ZONE="${2:?}"
CONFIG="${3:?}"
WORKDIR="${4:?}"
shift 4
printf -v ARGS '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/recall_jax && .venv/bin/python -m recall_jax.main --config $CONFIG --workdir $WORKDIR $ARGS"
