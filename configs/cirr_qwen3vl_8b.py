"""ReCALL on CIRR with Qwen3-VL-8B-Instruct (the paper's model-agnostic run: CIRR R@1 55.93 -> 57.09), with the
paper's hyperparameters of the Qwen2.5-VL-7B run (configs/cirr_qwen25vl_7b.py) and Qwen3-VL's backbone.

Launch on one 8-GPU node (launch/slurm_gpu.sh for several nodes, launch/tpu_pod.sh for TPU pods):
  python -m recall_jax.main --config configs/cirr_qwen3vl_8b.py --workdir runs/cirr_qwen3vl_8b \
    --config.model.checkpoint=/path/to/Qwen3-VL-8B-Instruct --config.data.root=/path/to/CIRR
Memory plan before paying for a slice (no TPU needed):
  python -m recall_jax.aot --config configs/cirr_qwen3vl_8b.py --topology v5p:2x2x1
"""

import ml_collections

from configs import base


def with_qwen3_vl(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The one switch to Qwen3-VL, plus the image bucket its 32-px merged patches need: 384 px = 12 x 12 merged
  tokens, the largest square within max_pixels (Qwen2.5-VL's 364 px is not a multiple of 32)."""
  c.model.family = "qwen3_vl"
  c.data.image_buckets = 384
  return c


def get_config() -> ml_collections.ConfigDict:
  return with_qwen3_vl(base.get_config())
