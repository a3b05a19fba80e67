"""ReCALL on CIRR with Qwen2.5-VL-7B-Instruct, the paper's hyperparameters (global batch 512 through GradCache).

Launch on one 8-GPU node (see launch/slurm_gpu.sh for several nodes, launch/tpu_pod.sh for TPU pods):
  python -m recall_jax.main --config configs/cirr_qwen25vl_7b.py --workdir runs/cirr_7b \
    --config.model.checkpoint=/path/to/Qwen2.5-VL-7B-Instruct --config.data.root=/path/to/CIRR
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  return base.get_config()
