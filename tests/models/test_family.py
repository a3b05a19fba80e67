"""Choosing the backbone: config model.family, checked against a checkpoint's config.json, and what it selects."""

import json

import pytest

from configs import tiny
from recall_jax import config_check
from recall_jax.models import family
from recall_jax.stages import common


def test_of_checkpoint_reads_model_type_and_refuses_the_other_family(tmp_path):
  for fam in family.FAMILIES.values():
    d = tmp_path / fam.name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(fam.tiny_config().to_hf_dict()))
    assert family.of_checkpoint(str(d)) is fam
    assert family.of_checkpoint(str(d), expected=fam.name) is fam
    other = next(n for n in family.FAMILIES if n != fam.name)
    with pytest.raises(ValueError, match=rf"{d}/config.json: model_type '{fam.model_type}', but config model.family"):
      family.of_checkpoint(str(d), expected=other)
  (tmp_path / "llava").mkdir()
  (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
  with pytest.raises(ValueError, match="model_type 'llava_next' is none of the supported"):
    family.of_checkpoint(str(tmp_path / "llava"))


def test_config_names_the_family_and_its_image_factor():
  cfg = tiny.get_config()
  cfg.model.family = "qwen4"
  with pytest.raises(config_check.ConfigError, match="model.family"):
    config_check.validate(cfg, ["prepare", "evaluate"])
  cfg.model.family = "qwen3_vl"  # the demo's 112 px bucket is no multiple of Qwen3-VL's 32 px
  with pytest.raises(config_check.ConfigError, match=r"data.image_buckets = 112.*multiple of 32"):
    config_check.validate(cfg, ["prepare", "evaluate"])
  cfg.data.image_buckets = 128
  config_check.validate(cfg, ["prepare", "evaluate"])
  enc = common.encode_config(cfg)
  assert (enc.patch_size, enc.image_mean, enc.image_buckets.factor) == (16, (0.5, 0.5, 0.5), 32)
  cfg.model.family, cfg.data.image_buckets = "qwen2_5_vl", 112
  enc = common.encode_config(cfg)
  assert (enc.patch_size, enc.image_buckets.factor) == (14, 28)


def test_each_family_targets_its_own_vision_down_projection():
  assert family.QWEN2_5_VL.lora_target_regex.endswith(r"visual\.blocks\.\d+\.mlp\.down_proj")
  assert family.QWEN3_VL.lora_target_regex.endswith(r"visual\.blocks\.\d+\.mlp\.linear_fc2")
