"""Hugging Face Qwen2.5-VL checkpoints <-> Qwen25VLModel: the family's binding of `recall_jax.models.hf_checkpoint`
(its config and model, the name map `names`, Qwen2-VL's image processor with CLIP mean / std)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax.typing import DTypeLike

from recall_jax.data import image
from recall_jax.models import hf_checkpoint
from recall_jax.models.hf_checkpoint import SafetensorsFile, write_safetensors  # noqa: F401  (re-exported)
from recall_jax.models.qwen2_5_vl import names
from recall_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from recall_jax.models.qwen2_5_vl.model import Qwen25VLModel

FORMAT = hf_checkpoint.CheckpointFormat(
    family="Qwen2.5-VL", config_cls=Qwen25VLConfig, model_cls=Qwen25VLModel, names=names,
    processor_class="Qwen2_5_VLProcessor", image_mean=image.OPENAI_CLIP_MEAN, image_std=image.OPENAI_CLIP_STD)


def from_pretrained(checkpoint_dir: str, dtype: DTypeLike = jnp.float32, mesh=None, shardings=None,
                    **config_overrides: Any) -> Qwen25VLModel:
  """An HF Qwen2.5-VL checkpoint directory (hub or transformers-5 key names) as a Qwen25VLModel: see
  `hf_checkpoint.from_pretrained` for mesh, shardings and config_overrides (e.g. position_mode="sequential")."""
  return hf_checkpoint.from_pretrained(FORMAT, checkpoint_dir, dtype, mesh, shardings, **config_overrides)


def save_pretrained(model: Qwen25VLModel, checkpoint_dir: str, **pixel_bounds: int) -> None:
  """config.json, model.safetensors (hub key names) and preprocessor_config.json that transformers'
  Qwen2_5_VLForConditionalGeneration and AutoImageProcessor read (pixel_bounds: min_pixels / max_pixels)."""
  hf_checkpoint.save_pretrained(FORMAT, model, checkpoint_dir, **pixel_bounds)


def preprocessor_config(cfg: Qwen25VLConfig, **pixel_bounds: int) -> dict[str, Any]:
  return hf_checkpoint.preprocessor_config(FORMAT, cfg, **pixel_bounds)


def param_path_to_hf_key(path) -> str:
  """The hub key of an NNX param path (what transformers' save_pretrained writes for Qwen2.5-VL)."""
  return hf_checkpoint.param_path_to_hf_key(path, names)
