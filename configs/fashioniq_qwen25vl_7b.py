"""ReCALL on FashionIQ with Qwen2.5-VL-7B-Instruct, the paper's hyperparameters.

Launch on one 8-GPU node:
  python -m recall_jax.main --config configs/fashioniq_qwen25vl_7b.py --workdir runs/fiq_7b \
    --config.model.checkpoint=/path/to/Qwen2.5-VL-7B-Instruct --config.data.root=/path/to/fashionIQ_dataset
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.data.dataset = "fashioniq"
  c.data.image_ext = ".png"  # set to ".jpg" for copies of the dataset that store JPEGs
  c.loss.temperature = 0.03
  c.loss.margin = 0.2
  c.optim.lr = 4e-5
  c.train.steps = 200
  c.train.best_metric = "R@10"
  c.mine.max_per_query = 1  # ReCALL's FashionIQ setting: the top-1 informative instance
  c.refine.steps = 250
  c.refine.margin = 0.2
  return c
