"""Hugging Face Qwen3-VL checkpoints <-> Qwen3VLModel: the family's binding of `recall_jax.models.hf_checkpoint`
(its config and model, the name map `names`, Qwen2-VL's image processor with Qwen3-VL's mean / std of 0.5)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax.typing import DTypeLike

from recall_jax.models import hf_checkpoint
from recall_jax.models.qwen3_vl import names
from recall_jax.models.qwen3_vl.config import Qwen3VLConfig
from recall_jax.models.qwen3_vl.model import Qwen3VLModel

IMAGE_MEAN = (0.5, 0.5, 0.5)  # Qwen3-VL's preprocessor_config.json
IMAGE_STD = (0.5, 0.5, 0.5)

FORMAT = hf_checkpoint.CheckpointFormat(
    family="Qwen3-VL", config_cls=Qwen3VLConfig, model_cls=Qwen3VLModel, names=names,
    processor_class="Qwen3VLProcessor", image_mean=IMAGE_MEAN, image_std=IMAGE_STD)


def from_pretrained(checkpoint_dir: str, dtype: DTypeLike = jnp.float32, mesh=None, shardings=None,
                    **config_overrides: Any) -> Qwen3VLModel:
  """An HF Qwen3-VL checkpoint directory (one file or sharded with an index) as a Qwen3VLModel: see
  `hf_checkpoint.from_pretrained` for mesh, shardings and config_overrides."""
  return hf_checkpoint.from_pretrained(FORMAT, checkpoint_dir, dtype, mesh, shardings, **config_overrides)


def save_pretrained(model: Qwen3VLModel, checkpoint_dir: str, **pixel_bounds: int) -> None:
  """config.json, model.safetensors (transformers' key names) and preprocessor_config.json that transformers'
  Qwen3VLForConditionalGeneration and AutoImageProcessor read (pixel_bounds: min_pixels / max_pixels)."""
  hf_checkpoint.save_pretrained(FORMAT, model, checkpoint_dir, **pixel_bounds)


def preprocessor_config(cfg: Qwen3VLConfig, **pixel_bounds: int) -> dict[str, Any]:
  return hf_checkpoint.preprocessor_config(FORMAT, cfg, **pixel_bounds)
