"""ReCALL on FashionIQ with Qwen3-VL-8B-Instruct: the FashionIQ settings of configs/fashioniq_qwen25vl_7b.py on the
Qwen3-VL backbone (configs/cirr_qwen3vl_8b.with_qwen3_vl).

Launch on one 8-GPU node:
  python -m recall_jax.main --config configs/fashioniq_qwen3vl_8b.py --workdir runs/fiq_qwen3vl_8b \
    --config.model.checkpoint=/path/to/Qwen3-VL-8B-Instruct --config.data.root=/path/to/fashionIQ_dataset
"""

import ml_collections

from configs import cirr_qwen3vl_8b, fashioniq_qwen25vl_7b


def get_config() -> ml_collections.ConfigDict:
  return cirr_qwen3vl_8b.with_qwen3_vl(fashioniq_qwen25vl_7b.get_config())
