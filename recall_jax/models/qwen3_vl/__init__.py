"""Qwen3-VL in Flax NNX, faithful to transformers' Qwen3VLForConditionalGeneration; HF checkpoint I/O."""

from recall_jax.models.qwen3_vl.config import Qwen3VLConfig
from recall_jax.models.qwen3_vl.model import Qwen3VLModel, Qwen3VLOutput
from recall_jax.models.qwen3_vl.params import from_pretrained, save_pretrained
from recall_jax.models.qwen3_vl.tiny import tiny_config

__all__ = ["Qwen3VLConfig", "Qwen3VLModel", "Qwen3VLOutput", "from_pretrained", "save_pretrained", "tiny_config"]
