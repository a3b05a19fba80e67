"""The model families recall_jax runs, and what selects one: config model.family, checked against a checkpoint's
config.json model_type.

A `Family` names everything that differs between backbones: the config and model classes, checkpoint I/O, the tiny
config the demo builds, the name map (LoRA targets, PEFT names), the vision geometry, and the image processor's
settings (patch size, mean / std). Stages, the embedding model, decoding, FLOP counting and the AOT tool ask this
module instead of importing a backbone. The chat format is the same for both families as recall_jax renders it
(data/prompts.py): every prompt names its system turn, so Qwen3-VL's template (which inserts no default system turn)
and Qwen2.5-VL's render the same text.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from recall_jax import files
from recall_jax.data import image
from recall_jax.models import qwen2_5_vl, qwen3_vl
from recall_jax.models.qwen2_5_vl import names as qwen2_5_names
from recall_jax.models.qwen2_5_vl import vision_geometry as qwen2_5_geometry
from recall_jax.models.qwen3_vl import names as qwen3_names
from recall_jax.models.qwen3_vl import params as qwen3_params
from recall_jax.models.qwen3_vl import vision_geometry as qwen3_geometry


@dataclasses.dataclass(frozen=True)
class Family:
  name: str  # config model.family
  model_type: str  # config.json's model_type
  config_cls: type
  vision_config_cls: type
  model_cls: type
  from_pretrained: Callable[..., Any]
  save_pretrained: Callable[..., None]
  tiny_config: Callable[..., Any]
  names: Any  # LORA_TARGET_REGEX, PEFT_NAMES, nnx_path, hf_name
  vision_geometry: Callable[..., dict]
  batch_geometry: Callable[..., dict]
  reference_shapes: Any  # the config of the released model the shipped configs train (AOT default)
  reference_name: str
  patch_size: int  # of every released checkpoint of the family; load_base_model checks the checkpoint's
  image_mean: tuple[float, ...]
  image_std: tuple[float, ...]

  @property
  def image_factor(self) -> int:
    """Image sides are multiples of this: one merged 2 x 2 patch group (both families merge 2 x 2)."""
    return 2 * self.patch_size

  @property
  def lora_target_regex(self) -> str:
    return self.names.LORA_TARGET_REGEX

  @property
  def peft_names(self):
    return self.names.PEFT_NAMES


QWEN2_5_VL = Family(
    name="qwen2_5_vl", model_type="qwen2_5_vl", config_cls=qwen2_5_vl.Qwen25VLConfig,
    vision_config_cls=qwen2_5_vl.config.VisionConfig, model_cls=qwen2_5_vl.Qwen25VLModel,
    from_pretrained=qwen2_5_vl.from_pretrained, save_pretrained=qwen2_5_vl.save_pretrained,
    tiny_config=qwen2_5_vl.tiny_config, names=qwen2_5_names, vision_geometry=qwen2_5_geometry.vision_geometry,
    batch_geometry=qwen2_5_geometry.batch_geometry, reference_shapes=qwen2_5_vl.Qwen25VLConfig(),
    reference_name="Qwen2.5-VL-7B", patch_size=14, image_mean=image.OPENAI_CLIP_MEAN,
    image_std=image.OPENAI_CLIP_STD)

QWEN3_VL = Family(
    name="qwen3_vl", model_type="qwen3_vl", config_cls=qwen3_vl.Qwen3VLConfig,
    vision_config_cls=qwen3_vl.config.VisionConfig, model_cls=qwen3_vl.Qwen3VLModel,
    from_pretrained=qwen3_vl.from_pretrained, save_pretrained=qwen3_vl.save_pretrained,
    tiny_config=qwen3_vl.tiny_config, names=qwen3_names, vision_geometry=qwen3_geometry.vision_geometry,
    batch_geometry=qwen3_geometry.batch_geometry, reference_shapes=qwen3_vl.config.QWEN3_VL_8B,
    reference_name="Qwen3-VL-8B", patch_size=16, image_mean=qwen3_params.IMAGE_MEAN,
    image_std=qwen3_params.IMAGE_STD)

FAMILIES = {f.name: f for f in (QWEN2_5_VL, QWEN3_VL)}


def get(name: str, key: str = "model.family") -> Family:
  """The family called `name`; an unknown name raises ValueError naming the config `key`."""
  if name not in FAMILIES:
    raise ValueError(f"config {key} must be one of {sorted(FAMILIES)}, got {name!r}")
  return FAMILIES[name]


def of_config(model_cfg: Any) -> Family:
  """The family of a model config (a Qwen25VLConfig or a Qwen3VLConfig)."""
  for family in FAMILIES.values():
    if isinstance(model_cfg, family.config_cls):
      return family
  raise TypeError(f"{type(model_cfg).__name__} is the config of no known model family")


def of_model(model: Any) -> Family:
  return of_config(model.cfg)


def batch_geometry(vision_cfg: Any, grid: tuple[int, int, int], images: int) -> dict:
  """The vision geometry of `images` images of one grid, for the family whose vision config this is."""
  for family in FAMILIES.values():
    if isinstance(vision_cfg, family.vision_config_cls):
      return family.batch_geometry(vision_cfg, grid, images)
  raise TypeError(f"{type(vision_cfg).__name__} is the vision config of no known model family")


def of_checkpoint(checkpoint_dir: str, expected: str | None = None, key: str = "model.family") -> Family:
  """The family of a Hugging Face checkpoint, by its config.json's model_type. With `expected` (the configured
  family), a checkpoint of another family raises ValueError naming both the file and the config `key`."""
  path = os.path.join(checkpoint_dir, "config.json")
  try:
    d = json.loads(files.read_text(path))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path}: no config.json in checkpoint directory") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: malformed JSON ({e})") from e
  model_type = d.get("model_type")
  found = [f for f in FAMILIES.values() if f.model_type == model_type]
  if not found:
    raise ValueError(f"{path}: model_type {model_type!r} is none of the supported families' "
                     f"({sorted(f.model_type for f in FAMILIES.values())})")
  if expected is not None and found[0].name != get(expected, key).name:
    raise ValueError(f"{path}: model_type {model_type!r}, but config {key} is {expected!r}; set "
                     f"--config.{key}={found[0].name} or use a {expected} checkpoint")
  return found[0]
