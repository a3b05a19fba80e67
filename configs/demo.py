"""The embedded default: the whole ReCALL pipeline on the synthetic CIR world with a tiny random Qwen2.5-VL, on a CPU.

Launch (what `bash launch/demo.sh` runs):
  python -m recall_jax.main --config configs/demo.py --workdir runs/demo
Override any field on the command line, e.g. `--config.data.dataset=cirr --config.world.scale=tiny`.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  # Add "teach" after prepare to fine-tune the foundation model on the world first (generative objective; ~6 min).
  c.stages = "prepare,adapt,mine,calibrate,refine,evaluate"
  c.model.checkpoint = ""  # the prepare stage writes a tiny random checkpoint into the workdir
  c.model.dtype = "float32"
  c.data.dataset = "fashioniq"
  c.data.root = ""  # the synthetic world of the prepare stage
  c.data.image_buckets = 112
  c.data.query_lengths = (320,)  # the tiny tokenizer is byte-level: prompts are long
  c.data.target_lengths = (128,)
  c.eval.batch_size = 32

  # A random tiny base learns from scratch: larger steps and a softer temperature than the paper's 7B run.
  c.loss.temperature = 0.05
  c.loss.margin = 0.2
  c.optim.lr = 2e-3
  c.train.steps = 300
  c.train.global_batch_size = 32
  c.train.chunk_size = 0
  c.train.log_every = 20
  c.train.checkpoint_every = 100
  c.train.eval_every = 100
  c.train.best_metric = "R@10"  # FashionIQ reports R@10 / R@50
  c.train.data_workers = 0
  c.mine.max_per_query = 1  # ReCALL's FashionIQ setting
  c.calibrate.batch_size = 8
  c.calibrate.max_records = 64  # the random model writes noise: a sample shows the mechanics
  c.calibrate.max_new_tokens = 192  # byte-level tokens: a rewrite answer is 60-320 of them
  c.refine.steps = 150
  c.refine.margin = 0.2
  return c
