"""The full Qwen3-VL model in Flax NNX: vision tower with DeepStack, image-token scatter, Qwen3 decoder, lm_head.

The same two levels and methods as `recall_jax.models.qwen2_5_vl.model.Qwen25VLModel`, so every stage, the
embedding model and the sampler drive either family:
  * `prepare(input_ids, attention_mask, image_grid_thw, pixel_values)` on the host (numpy): position ids (Qwen3-VL's
    get_rope_index equals Qwen2.5-VL's for images) and the vision geometry;
  * `forward(inputs)` / `hidden_states(inputs, cache=None)` / `logits(hidden)`: pure and jittable.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from recall_jax.models import remat
from recall_jax.models.qwen2_5_vl.model import Qwen25VLOutput, jitted_forward, prepare_inputs, scatter_image_embeds
from recall_jax.models.qwen3_vl.config import Qwen3VLConfig
from recall_jax.models.qwen3_vl.text import TextModel
from recall_jax.models.qwen3_vl.vision import VisionModel
from recall_jax.models.qwen3_vl.vision_geometry import vision_geometry

Qwen3VLOutput = Qwen25VLOutput  # logits (B, L, vocab), hidden_states (B, L, hidden) after the final norm


class Qwen3VLModel(nnx.Module):
  """Qwen3VLForConditionalGeneration: `visual`, `language_model` and (untied) `lm_head`."""

  def __init__(self, cfg: Qwen3VLConfig, *, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike = jnp.float32,
               rngs: nnx.Rngs):
    if cfg.vision.out_hidden_size != cfg.text.hidden_size:
      raise ValueError(f"vision out_hidden_size {cfg.vision.out_hidden_size} != text hidden_size "
                       f"{cfg.text.hidden_size}")
    if len(cfg.vision.deepstack_visual_indexes) > cfg.text.num_hidden_layers:
      raise ValueError(f"{len(cfg.vision.deepstack_visual_indexes)} DeepStack taps for a decoder of "
                       f"{cfg.text.num_hidden_layers} layers")
    self.cfg = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    remat.check(cfg.remat)
    self.visual = VisionModel(cfg.vision, remat=cfg.remat, **kw)
    self.language_model = TextModel(cfg.text, remat=cfg.remat, **kw)
    if not cfg.tie_word_embeddings:
      self.lm_head = nnx.Linear(cfg.text.hidden_size, cfg.text.vocab_size, use_bias=False, **kw)

  def prepare(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
              image_grid_thw: np.ndarray | None = None, pixel_values: np.ndarray | None = None) -> dict[str, Any]:
    """Host-side inputs of `forward` (as Qwen25VLModel.prepare), with Qwen3-VL's vision geometry."""
    return prepare_inputs(self.cfg, vision_geometry, input_ids, attention_mask, image_grid_thw, pixel_values)

  def embed_inputs(self, inputs: dict[str, Any]) -> tuple[jax.Array, list[jax.Array]]:
    """(token embeddings with the merged image tokens scattered into the image-pad positions (B, L, H), the
    DeepStack features scattered the same way into zeros, one (B, L, H) per tap)."""
    input_ids = inputs["input_ids"]
    x = self.language_model.embed_tokens(input_ids)
    if "vision" not in inputs:
      return x, []
    image_embeds, deepstack = self.visual.features(inputs["pixel_values"], inputs["vision"])
    image_mask = input_ids == self.cfg.image_token_id
    zeros = jnp.zeros_like(x)
    return (scatter_image_embeds(x, image_mask, image_embeds),
            [scatter_image_embeds(zeros, image_mask, d) for d in deepstack])

  def hidden_states(self, inputs: dict[str, Any], cache=None):
    """Final hidden states (after the last norm); with a KV cache (a prefill): (hidden states, cache)."""
    x, deepstack = self.embed_inputs(inputs)
    return self.language_model(x, inputs["position_ids"], inputs["attention_mask"], cache=cache, deepstack=deepstack)

  def forward(self, inputs: dict[str, Any]) -> Qwen3VLOutput:
    hidden = self.hidden_states(inputs)
    return Qwen3VLOutput(logits=self.logits(hidden), hidden_states=hidden)

  def logits(self, hidden: jax.Array) -> jax.Array:
    if self.cfg.tie_word_embeddings:
      return self.language_model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def __call__(self, *, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
               pixel_values: np.ndarray | None = None, image_grid_thw: np.ndarray | None = None) -> Qwen3VLOutput:
    """The HF processor's arrays in, logits and final hidden states out; the forward is jitted per shape bucket."""
    if image_grid_thw is not None and pixel_values is None:
      raise ValueError("image_grid_thw given without pixel_values")
    inputs = self.prepare(input_ids, attention_mask, image_grid_thw, pixel_values)
    graphdef, state = nnx.split(self)
    return jitted_forward(graphdef, state, inputs)
