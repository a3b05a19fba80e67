"""Qwen3-VL configuration: frozen dataclasses read from a Hugging Face config.json (transformers' Qwen3VLConfig).

Field names and defaults follow transformers 5.23's `Qwen3VLVisionConfig` / `Qwen3VLTextConfig` / `Qwen3VLConfig`.
The fields the rest of recall_jax reads off a model config (`vision.spatial_merge_size`, `vision.patch_size`,
`vision.patch_dim`, `vision.out_hidden_size`, `text.hidden_size`, `text.num_hidden_layers`, `text.head_dim`,
`text.num_key_value_heads`, `text.vocab_size`, the special-token ids, `position_mode`, `remat`) mean the same as in
`recall_jax.models.qwen2_5_vl.config`, so stages, the sampler and the KV cache serve either family.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from recall_jax.models.qwen2_5_vl.config import PositionMode, _first_id, read_config_json
from recall_jax.models.remat import RematPolicy

MODEL_TYPE = "qwen3_vl"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 27
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 16
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  out_hidden_size: int = 3584
  # A square table of learned absolute positions, bilinearly resampled to every image's patch grid.
  num_position_embeddings: int = 2304
  # After these blocks a DeepStack merger's output is added to the visual positions of decoder layer 0, 1, ...
  deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
  hidden_act: str = "gelu_pytorch_tanh"
  layer_norm_eps: float = 1e-6  # transformers hard-codes the tower's LayerNorm eps
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch: channels x temporal x patch x patch (1536 for the real model)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def num_grid_per_side(self) -> int:
    return int(self.num_position_embeddings**0.5)


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 151936
  hidden_size: int = 4096
  intermediate_size: int = 22016
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int = 128  # explicit (not hidden / heads), as Qwen3
  rms_norm_eps: float = 1e-6
  rope_theta: float = 500000.0
  # Interleaved M-RoPE: frequency j reads the h stream when j % 3 == 1 and j < 3 * section[1], the w stream when
  # j % 3 == 2 and j < 3 * section[2], else the t stream (transformers' Qwen3VLTextRotaryEmbedding).
  mrope_section: tuple[int, ...] = (24, 20, 20)
  attention_bias: bool = False
  max_position_embeddings: int = 128000


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int = 151643
  eos_token_id: int = 151645
  tie_word_embeddings: bool = False
  position_mode: PositionMode = "mrope"  # as Qwen25VLConfig.position_mode
  remat: RematPolicy = "none"  # as Qwen25VLConfig.remat (a run choice, not part of the checkpoint)

  def replace(self, **kw) -> "Qwen3VLConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config") -> "Qwen3VLConfig":
    """Reads transformers' nested layout (`text_config` / `vision_config`); mrope_section from the text config's
    rope_parameters or rope_scaling (the hub's configs), default (24, 20, 20) as transformers."""
    if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
      raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not {MODEL_TYPE!r}")
    t = d.get("text_config")
    v = d.get("vision_config")
    if t is None or v is None:
      raise ValueError(f"{source}: a Qwen3-VL config needs 'text_config' and 'vision_config'")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
      if key not in t:
        raise ValueError(f"{source}: missing text_config key {key!r}")
    for key in ("depth", "hidden_size", "intermediate_size", "num_heads"):
      if key not in v:
        raise ValueError(f"{source}: missing vision_config key {key!r}")
    rope = {**(t.get("rope_scaling") or {}), **(t.get("rope_parameters") or {})}
    if rope.get("rope_type", "default") != "default":
      raise ValueError(f"{source}: text rope_type {rope['rope_type']!r} is not supported (only 'default')")
    text_cfg = TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", TextConfig.rope_theta))),
        mrope_section=tuple(int(x) for x in rope.get("mrope_section", TextConfig.mrope_section)),
        attention_bias=bool(t.get("attention_bias", False)),
        max_position_embeddings=t.get("max_position_embeddings", 128000),
    )
    if t.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{source}: text hidden_act {t['hidden_act']!r} is not supported (only 'silu')")
    vrope = v.get("rope_parameters") or {}
    vision_cfg = VisionConfig(
        depth=v["depth"],
        hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"],
        num_heads=v["num_heads"],
        in_channels=v.get("in_channels", 3),
        patch_size=v.get("patch_size", 16),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        out_hidden_size=v.get("out_hidden_size", text_cfg.hidden_size),
        num_position_embeddings=v.get("num_position_embeddings", 2304),
        deepstack_visual_indexes=tuple(int(i) for i in v.get("deepstack_visual_indexes", (8, 16, 24))),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )
    tie = d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
    return cls(
        vision=vision_cfg,
        text=text_cfg,
        image_token_id=d.get("image_token_id", 151655),
        video_token_id=d.get("video_token_id", 151656),
        vision_start_token_id=d.get("vision_start_token_id", 151652),
        vision_end_token_id=d.get("vision_end_token_id", 151653),
        bos_token_id=_first_id(t.get("bos_token_id", d.get("bos_token_id")), 151643),
        eos_token_id=_first_id(t.get("eos_token_id", d.get("eos_token_id")), 151645),
        tie_word_embeddings=bool(tie),
    )

  @classmethod
  def from_pretrained(cls, checkpoint_dir: str) -> "Qwen3VLConfig":
    d, path = read_config_json(checkpoint_dir)
    return cls.from_hf_dict(d, source=path)

  def to_hf_dict(self) -> dict[str, Any]:
    """transformers' nested layout, readable by `Qwen3VLConfig.from_dict` and by `from_hf_dict`."""
    t, v = self.text, self.vision
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        "image_token_id": self.image_token_id,
        "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id,
        "vision_end_token_id": self.vision_end_token_id,
        "tie_word_embeddings": self.tie_word_embeddings,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": t.rms_norm_eps,
            "attention_bias": t.attention_bias,
            "max_position_embeddings": t.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section), "mrope_interleaved": True},
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "out_hidden_size": v.out_hidden_size,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            "hidden_act": v.hidden_act,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        },
    }


# Qwen3-VL-8B-Instruct's shapes, the paper's model (the AOT tool's default when config model.checkpoint is unset):
# its decoder is Qwen3-8B's (4096 wide, 36 layers, 32 query / 8 KV heads of 128, SwiGLU 12288, rope theta 5e6,
# untied head), its tower transformers' default (27 blocks of 1152, DeepStack after blocks 8, 16 and 24) projecting
# to 4096. No checkpoint can be downloaded here; a real config.json (model.checkpoint) always takes precedence.
QWEN3_VL_8B = Qwen3VLConfig(
    vision=VisionConfig(out_hidden_size=4096),
    text=TextConfig(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, rope_theta=5000000.0, max_position_embeddings=262144),
)
