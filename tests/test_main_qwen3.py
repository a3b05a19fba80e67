"""The main job end to end with the other backbone: config model.family = "qwen3_vl" is the one line a user changes.

Every stage (teach included: F is fine-tuned, saved and reloaded as Qwen3-VL), the adapters' PEFT files, the
embedding model and decoding run on a tiny random Qwen3-VL; a checkpoint of the other family is refused by name.
"""

import json
import os

import pytest

from configs import tiny
from recall_jax import main
from recall_jax.embed import Embedder


def _config():
  cfg = tiny.get_config()
  cfg.model.family = "qwen3_vl"
  cfg.world.image_size = 64  # Qwen3-VL's images are multiples of 32 (16-px patches, merged 2 x 2)
  cfg.data.image_buckets = 64
  cfg.eval.sheet_queries = 2
  cfg.teach.steps = 4
  cfg.teach.log_every = 2
  cfg.teach.checkpoint_every = 100
  cfg.train.steps = 2
  cfg.refine.steps = 2
  cfg.train.global_batch_size = 8
  cfg.train.log_every = 1
  cfg.train.checkpoint_every = cfg.train.eval_every = 100
  cfg.lora.rank = 4
  cfg.mine.batch_size = 8
  cfg.mine.sheet_queries = 1
  cfg.calibrate.max_records = 2
  cfg.calibrate.max_new_tokens = 16
  cfg.calibrate.sheet_samples = 1
  return cfg


def test_whole_pipeline_on_tiny_qwen3_vl(tmp_path):
  workdir = str(tmp_path / "run")
  stages = ["prepare", "teach", "adapt", "mine", "calibrate", "refine", "evaluate", "report"]
  out = main.run(_config(), workdir, stages)
  for path in ("prepare/checkpoint", "teach/checkpoint"):
    assert json.load(open(os.path.join(workdir, path, "config.json")))["model_type"] == "qwen3_vl"
  adapter_dir = os.path.join(workdir, "refine", "adapters")
  peft_keys = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))["target_modules"]
  assert any("linear_fc2" in k for k in peft_keys)  # Qwen3-VL's vision MLP "down" projection is adapted
  report = json.load(open(os.path.join(workdir, "report.json")))
  assert set(report) >= {"baseline", "refined"} and out["evaluate"]["metrics"]
  encode = json.load(open(os.path.join(adapter_dir, "recall_config.json")))["encode"]
  assert encode["patch_size"] == 16 and encode["image_mean"] == [0.5, 0.5, 0.5]
  # The adapters embed again from their files alone, as the stage embedded them.
  embedder = Embedder.from_pretrained(adapter_dir)
  assert type(embedder.model).__name__ == "Qwen3VLModel"

  # The other family's checkpoint under this config: refused, naming the file and the key.
  cfg = _config()
  cfg.model.family = "qwen2_5_vl"
  cfg.data.image_buckets = 56
  cfg.world.image_size = 56
  cfg.model.checkpoint = os.path.join(workdir, "prepare", "checkpoint")
  with pytest.raises(ValueError, match=r"config.json: model_type 'qwen3_vl', but config model.family"):
    main.run(cfg, str(tmp_path / "other"), ["evaluate"])
