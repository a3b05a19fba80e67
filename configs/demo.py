"""The embedded default: the ReCALL pipeline on the synthetic CIR world with a tiny random Qwen2.5-VL, on a CPU.

Launch (what `bash launch/demo.sh` runs):
  python -m recall_jax.main --config configs/demo.py --workdir runs/demo
Override any field on the command line, e.g. `--config.data.dataset=cirr --config.world.scale=tiny`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "prepare,evaluate"

  c.world = ml_collections.ConfigDict()
  c.world.scale = "demo"  # tiny | demo | large
  c.world.seed = 0
  c.world.image_size = 112

  c.model = ml_collections.ConfigDict()
  c.model.checkpoint = ""  # empty: the prepare stage writes a tiny random checkpoint into the workdir
  c.model.tiny = ml_collections.ConfigDict({"text": {}, "vision": {}})
  c.model.init_seed = 0
  c.model.dtype = "float32"
  c.model.position_mode = "mrope"  # mrope | sequential

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "fashioniq"  # fashioniq | cirr | circo
  c.data.root = ""  # empty: the synthetic world of the prepare stage
  c.data.categories = ("dress", "shirt", "toptee")
  c.data.image_ext = ".png"
  c.data.on_error = "raise"
  c.data.image_buckets = 112  # one square bucket: every batch has the same image grid
  c.data.query_lengths = (320,)
  c.data.target_lengths = (128,)
  c.data.caption_join = "and"

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "val"
  c.eval.batch_size = 32
  c.eval.exclude_reference = ml_collections.config_dict.placeholder(bool)  # None: the dataset's protocol default
  c.eval.sheet_queries = 8

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor)
  return c
