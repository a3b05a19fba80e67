"""Qwen2.5-VL configuration: frozen dataclasses read from a Hugging Face config.json (both layouts)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

from recall_jax.models.remat import RematPolicy

PositionMode = Literal["mrope", "sequential"]


def read_config_json(checkpoint_dir: str) -> tuple[dict[str, Any], str]:
  """(the checkpoint's config.json as a dict, its path); a missing or malformed file raises naming it."""
  path = os.path.join(checkpoint_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no config.json in checkpoint directory")
  try:
    with open(path) as f:
      return json.load(f), path
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: malformed JSON ({e})") from e


def _first_id(value: Any, default: int) -> int:
  """Token id fields may be an int, a list of ints (several EOS ids) or absent."""
  if value is None:
    return default
  return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  out_hidden_size: int = 3584
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch: channels x temporal x patch x patch (1176 for the real model)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 128000

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int = 151643
  eos_token_id: int = 151645
  tie_word_embeddings: bool = False
  # "mrope": Qwen2.5-VL's 3-D positions; "sequential": plain 1-D positions for every token (what the
  # released ReCALL code ends up using).
  position_mode: PositionMode = "mrope"
  # Activation checkpointing of every decoder layer and vision block in training (models/remat.py); a run choice,
  # not part of the checkpoint: config model.remat.
  remat: RematPolicy = "none"

  def replace(self, **kw) -> "Qwen25VLConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config") -> "Qwen25VLConfig":
    """Reads both the flat hub layout (text fields at top level, `rope_scaling.mrope_section`) and the nested
    transformers-5 layout (`text_config` with `rope_parameters`)."""
    text = dict(d.get("text_config") or {})
    flat = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
    # Flat layout: text fields at top level. Nested layout: they live in text_config (which wins).
    t = {**flat, **text}
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if isinstance(rope, dict) and "mrope_section" not in rope:
      # Some nested configs keep mrope_section in a top-level rope_scaling.
      rope = {**(flat.get("rope_scaling") or {}), **rope}
    theta = t.get("rope_theta", (rope or {}).get("rope_theta", TextConfig.rope_theta))
    mrope = (rope or {}).get("mrope_section")
    if mrope is None:
      raise ValueError(f"{source}: no mrope_section in rope_scaling/rope_parameters; not a Qwen2.5-VL config")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
      if key not in t:
        raise ValueError(f"{source}: missing text config key {key!r}")
    text_cfg = TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        mrope_section=tuple(int(x) for x in mrope),
        max_position_embeddings=t.get("max_position_embeddings", 128000),
    )
    v = d.get("vision_config")
    if v is None:
      raise ValueError(f"{source}: missing key 'vision_config'")
    for key in ("depth", "intermediate_size", "num_heads"):
      if key not in v:
        raise ValueError(f"{source}: missing vision_config key {key!r}")
    if "hidden_size" not in v and "embed_dim" not in v:
      raise ValueError(f"{source}: missing vision_config key 'hidden_size' (or 'embed_dim')")
    vrope = v.get("rope_parameters") or {}
    vision_cfg = VisionConfig(
        depth=v["depth"],
        hidden_size=v.get("hidden_size", v.get("embed_dim")),
        intermediate_size=v["intermediate_size"],
        num_heads=v["num_heads"],
        in_channels=v.get("in_channels", v.get("in_chans", 3)),
        patch_size=v.get("patch_size", 14),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        window_size=v.get("window_size", 112),
        out_hidden_size=v.get("out_hidden_size", text_cfg.hidden_size),
        fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", ())),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )
    tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return cls(
        vision=vision_cfg,
        text=text_cfg,
        image_token_id=d.get("image_token_id", 151655),
        video_token_id=d.get("video_token_id", 151656),
        vision_start_token_id=d.get("vision_start_token_id", 151652),
        vision_end_token_id=d.get("vision_end_token_id", 151653),
        bos_token_id=_first_id(t.get("bos_token_id"), 151643),
        eos_token_id=_first_id(t.get("eos_token_id"), 151645),
        tie_word_embeddings=bool(tie),
    )

  @classmethod
  def from_pretrained(cls, checkpoint_dir: str) -> "Qwen25VLConfig":
    d, path = read_config_json(checkpoint_dir)
    return cls.from_hf_dict(d, source=path)

  def to_hf_dict(self) -> dict[str, Any]:
    """The nested transformers-5 layout, readable by `Qwen2_5_VLConfig.from_dict` and by `from_hf_dict`."""
    t, v = self.text, self.vision
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "image_token_id": self.image_token_id,
        "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id,
        "vision_end_token_id": self.vision_end_token_id,
        "tie_word_embeddings": self.tie_word_embeddings,
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section)},
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "out_hidden_size": v.out_hidden_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
        },
    }
