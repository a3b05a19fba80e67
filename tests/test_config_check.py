"""The whole config checked before any stage runs: each bad value of the issue's list is named with its key, its
value and what is allowed, all problems at once, and nothing (not even prepare) starts."""

import os

import pytest

from configs import demo, tiny
from configs import cirr_qwen25vl_7b, fashioniq_qwen25vl_7b, study
from recall_jax import config_check, main, parallel


def _set(cfg, key, value):
  *path, leaf = key.split(".")
  node = cfg
  for p in path:
    node = node[p]
  node[leaf] = value
  return cfg


def test_the_shipped_configs_are_valid():
  for module in (demo, tiny, study, cirr_qwen25vl_7b, fashioniq_qwen25vl_7b):
    cfg = module.get_config()
    if cfg.model.checkpoint is None:
      cfg.model.checkpoint = "/ckpt"  # the 7B configs take it from the command line
    assert config_check.problems(cfg, cfg.stages.split(",")) == [], module.__name__


@pytest.mark.parametrize("key, value, message", [
    ("train.global_batch_size", -4, r"train.global_batch_size = -4: must be in \[1, inf\)"),
    ("data.dataset", "imagenet", r"data.dataset = 'imagenet': must be one of \['fashioniq', 'cirr', 'circo'\]"),
    ("calibrate.vqa_threshold", 1.5, r"calibrate.vqa_threshold = 1.5: must be in \[0.0, 1.0\]"),
    ("train.steps", 0, r"train.steps = 0: must be in \[1, inf\)"),
    ("mine.strategy", "hardest", r"mine.strategy = 'hardest': must be one of \['self_guided'"),
    ("lora.init", "kaimin", r"lora.init = 'kaimin': must be one of \['gaussian', 'kaiming'\]"),
    ("model.position_mode", "rope", r"model.position_mode = 'rope'"),
    ("calibrate.prompt_mode", "cot", r"calibrate.prompt_mode = 'cot'"),
    ("optim.lr", float("nan"), r"optim.lr = nan: expected a finite number"),
    ("train.chunk_size", 3, r"global_batch_size = 32 must be a multiple of train.chunk_size = 3"),
    ("data.query_lengths", (), r"data.query_lengths = \(\): must be a non-empty list"),
    ("data.target_lengths", (16,), r"data.target_lengths = \(16,\): every bucket must exceed the 16 merged tokens"),
    ("data.image_buckets", 100, r"data.image_buckets = 100: image bucket \(100, 100\) is not a multiple of 28"),
    ("teach.batch_size", 6, r"teach.batch_size = 6 must be a multiple of the 8 batch shards of mesh"),
])
def test_a_bad_value_is_named_before_prepare_starts(tmp_path, key, value, message):
  cfg = _set(demo.get_config(), key, value)
  workdir = str(tmp_path / "run")
  with pytest.raises(config_check.ConfigError, match=message):
    main.run(cfg, workdir, ["prepare", "teach", "adapt", "mine", "calibrate"])
  assert not os.path.exists(workdir)  # nothing started


def test_every_problem_is_listed_at_once_and_batch_shards_are_checked():
  cfg = demo.get_config()
  _set(cfg, "train.steps", 0)
  _set(cfg, "refine.mode", "both")
  found = config_check.problems(cfg, ["adapt", "refine"])
  assert len(found) == 2 and any("refine.mode" in p for p in found)
  cfg = demo.get_config()
  cfg.mesh.shape = (-1, 1, 1)  # 8 test devices
  cfg.train.global_batch_size, cfg.eval.batch_size = 12, 20
  mesh = parallel.mesh_from_config(cfg)
  assert config_check.problems(cfg, ["adapt"]) == []  # the batch shards are known once the mesh is
  shards = "the 8 batch shards of mesh {'data': 8, 'fsdp': 1, 'tensor': 1} (config mesh.shape = (-1, 1, 1))"
  assert config_check.problems(cfg, ["adapt"], mesh) == [f"config eval.batch_size = 20 must be a multiple of {shards}",
                                                         f"config train.global_batch_size = 12 must be a multiple of "
                                                         f"{shards}"]
  cfg.train.chunk_size = 4
  assert config_check.problems(cfg, ["mine", "calibrate"], mesh) == []  # decoding fills its own batches
  assert f"config train.chunk_size = 4 must be a multiple of {shards}" in config_check.problems(cfg, ["refine"], mesh)
  cfg = demo.get_config()
  cfg.model.checkpoint = None
  assert "model.checkpoint is required" in config_check.problems(cfg, ["adapt"])[0]


def test_fresh_renders_need_the_synthetic_world():
  cfg = demo.get_config()
  cfg.teach.vision.fresh_images = 100
  assert config_check.problems(cfg, ["teach"]) == []
  cfg.data.root = "/data/fashioniq"
  assert config_check.problems(cfg, ["teach"]) == [
      "config teach.vision.fresh_images = 100 renders the synthetic world, but data.root = '/data/fashioniq' is a "
      "real dataset: set it to 0"]
  assert config_check.problems(cfg, ["adapt"]) == []  # only the teach stage renders
