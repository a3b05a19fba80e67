"""A tiny Qwen3-VL configuration for tests and the demo, with the tiny tokenizer's special-token ids.

Small, but with every structural feature of the real model: GQA (2 query heads per KV head), an explicit head_dim,
interleaved M-RoPE sections, a 4 x 4 learned position table that test images (larger grids) must resample, and
DeepStack taps after vision blocks 0 and 1 feeding decoder layers 0 and 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from recall_jax.models.qwen2_5_vl import tiny as qwen2_5_tiny
from recall_jax.models.qwen3_vl.config import Qwen3VLConfig, TextConfig, VisionConfig

_TINY_TEXT = TextConfig(
    vocab_size=qwen2_5_tiny.TINY_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_theta=500000.0,
    mrope_section=(2, 3, 3),
    max_position_embeddings=4096,
)

_TINY_VISION = VisionConfig(
    depth=3,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=64,
    num_position_embeddings=16,
    deepstack_visual_indexes=(0, 1),
)


def tiny_config(**overrides: Any) -> Qwen3VLConfig:
  """The tiny config; `overrides` replace top-level fields, and `text=` / `vision=` may be dicts of field overrides
  (as qwen2_5_vl.tiny_config)."""
  text = overrides.pop("text", {})
  vision = overrides.pop("vision", {})
  text_cfg = text if isinstance(text, TextConfig) else dataclasses.replace(_TINY_TEXT, **text)
  if isinstance(vision, VisionConfig):
    vision_cfg = vision
  else:
    vision_cfg = dataclasses.replace(_TINY_VISION, **{"out_hidden_size": text_cfg.hidden_size, **vision})
  cfg = Qwen3VLConfig(
      vision=vision_cfg,
      text=text_cfg,
      image_token_id=qwen2_5_tiny.TINY_IMAGE_TOKEN_ID,
      video_token_id=qwen2_5_tiny.TINY_VIDEO_TOKEN_ID,
      vision_start_token_id=qwen2_5_tiny.TINY_VISION_START_TOKEN_ID,
      vision_end_token_id=qwen2_5_tiny.TINY_VISION_END_TOKEN_ID,
      bos_token_id=qwen2_5_tiny.TINY_PAD_TOKEN_ID,
      eos_token_id=qwen2_5_tiny.TINY_EOS_TOKEN_ID,
  )
  return cfg.replace(**overrides)
