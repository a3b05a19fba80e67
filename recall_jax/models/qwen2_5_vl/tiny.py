"""A tiny Qwen2.5-VL configuration for tests and the demo, with the tiny tokenizer's special-token ids.

Shapes are small but keep every structural feature of the real model: GQA (2 query heads per KV head), M-RoPE
sections summing to head_dim / 2, a vision window (112 px = 4 merged patches) smaller than typical test images,
and one full-attention vision block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from recall_jax.models.qwen2_5_vl import tiny_tokenizer
from recall_jax.models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, VisionConfig

# The special-token ids of the tiny tokenizer, which owns them (the world BPE keeps them too).
TINY_VOCAB_SIZE = tiny_tokenizer.TINY_VOCAB_SIZE
TINY_IMAGE_TOKEN_ID = tiny_tokenizer.TINY_TOKEN_IDS["<|image_pad|>"]
TINY_VIDEO_TOKEN_ID = tiny_tokenizer.TINY_TOKEN_IDS["<|video_pad|>"]
TINY_VISION_START_TOKEN_ID = tiny_tokenizer.TINY_TOKEN_IDS["<|vision_start|>"]
TINY_VISION_END_TOKEN_ID = tiny_tokenizer.TINY_TOKEN_IDS["<|vision_end|>"]
TINY_PAD_TOKEN_ID = tiny_tokenizer.TINY_TOKEN_IDS["<|endoftext|>"]
TINY_EOS_TOKEN_ID = tiny_tokenizer.TINY_TOKEN_IDS["<|im_end|>"]

_TINY_TEXT = TextConfig(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    mrope_section=(2, 3, 3),
    max_position_embeddings=4096,
)

_TINY_VISION = VisionConfig(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=14,
    temporal_patch_size=2,
    spatial_merge_size=2,
    window_size=112,
    out_hidden_size=64,
    fullatt_block_indexes=(1,),
)


def tiny_config(**overrides: Any) -> Qwen25VLConfig:
  """The tiny config; `overrides` replace top-level fields, and `text=` / `vision=` may be dicts of field overrides.

  Example: tiny_config(tie_word_embeddings=True, text=dict(num_hidden_layers=1), vision=dict(depth=4)).
  """
  text = overrides.pop("text", {})
  vision = overrides.pop("vision", {})
  text_cfg = text if isinstance(text, TextConfig) else dataclasses.replace(_TINY_TEXT, **text)
  if isinstance(vision, VisionConfig):
    vision_cfg = vision
  else:
    # The merger projects to the LLM width unless the caller says otherwise.
    vision_cfg = dataclasses.replace(_TINY_VISION, **{"out_hidden_size": text_cfg.hidden_size, **vision})
  cfg = Qwen25VLConfig(
      vision=vision_cfg,
      text=text_cfg,
      image_token_id=TINY_IMAGE_TOKEN_ID,
      video_token_id=TINY_VIDEO_TOKEN_ID,
      vision_start_token_id=TINY_VISION_START_TOKEN_ID,
      vision_end_token_id=TINY_VISION_END_TOKEN_ID,
      bos_token_id=TINY_PAD_TOKEN_ID,
      eos_token_id=TINY_EOS_TOKEN_ID,
  )
  return cfg.replace(**overrides)
