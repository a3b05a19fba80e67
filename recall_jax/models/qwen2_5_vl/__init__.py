"""Qwen2.5-VL in Flax NNX, faithful to transformers' Qwen2_5_VLForConditionalGeneration; HF checkpoint I/O."""

from recall_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from recall_jax.models.qwen2_5_vl.model import Qwen25VLModel, Qwen25VLOutput
from recall_jax.models.qwen2_5_vl.params import from_pretrained, save_pretrained
from recall_jax.models.qwen2_5_vl.tiny import tiny_config

__all__ = ["Qwen25VLConfig", "Qwen25VLModel", "Qwen25VLOutput", "from_pretrained", "save_pretrained", "tiny_config"]
