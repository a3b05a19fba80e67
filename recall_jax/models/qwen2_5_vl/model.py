"""The full Qwen2.5-VL model in Flax NNX: vision tower, image-token scatter, Qwen2 decoder, lm_head.

Two levels:
  * `prepare(input_ids, attention_mask, image_grid_thw, pixel_values)` on the host (numpy): position ids and the
    vision geometry; every array's shape is fixed by the (length, image-grid) bucket.
  * `forward(inputs)`: pure and jittable over the dict `prepare` returns.
`model(input_ids=..., attention_mask=..., pixel_values=..., image_grid_thw=...)` does both, with the forward jitted
once per shape bucket.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.typing import DTypeLike

from recall_jax.models import remat
from recall_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from recall_jax.models.qwen2_5_vl.positions import position_ids_for
from recall_jax.models.qwen2_5_vl.text import TextModel
from recall_jax.models.qwen2_5_vl.vision import VisionTransformer
from recall_jax.models.qwen2_5_vl.vision_geometry import vision_geometry


@struct.dataclass
class Qwen25VLOutput:
  logits: jax.Array  # (B, L, vocab)
  hidden_states: jax.Array  # (B, L, hidden), after the final norm


def scatter_image_embeds(inputs_embeds: jax.Array, image_mask: jax.Array, image_embeds: jax.Array) -> jax.Array:
  """Puts image_embeds (N, H) into the positions where image_mask (B, L) is set, in row-major order (as
  transformers' masked_scatter); the host has checked that the mask holds exactly N positions."""
  flat_mask = image_mask.reshape(-1)
  index = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, image_embeds.shape[0] - 1)
  gathered = jnp.take(image_embeds.astype(inputs_embeds.dtype), index, axis=0).reshape(inputs_embeds.shape)
  return jnp.where(image_mask[..., None], gathered, inputs_embeds)


def prepare_inputs(cfg, geometry_fn, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                   image_grid_thw: np.ndarray | None = None, pixel_values: np.ndarray | None = None) -> dict[str, Any]:
  """A model's `prepare`, checked: ids, mask, position ids (3, B, L) and, with images, `geometry_fn(grids,
  cfg.vision)` and the pixel values. Shared by both families (their configs name the same fields)."""
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
  if attention_mask is None:
    attention_mask = np.ones_like(input_ids)
  attention_mask = np.asarray(attention_mask)
  if attention_mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
  if np.any(input_ids == cfg.video_token_id):
    raise ValueError(f"input_ids hold video tokens (id {cfg.video_token_id}); videos are not supported")
  if pixel_values is not None and image_grid_thw is None:
    raise ValueError("pixel_values given without image_grid_thw")
  image_mask = input_ids == cfg.image_token_id
  if np.any(image_mask & ~attention_mask.astype(bool)):
    raise ValueError("input_ids hold image tokens at padding positions (attention_mask == 0)")
  num_image_tokens = int(np.sum(image_mask))
  if image_grid_thw is None and num_image_tokens:
    raise ValueError(f"input_ids hold {num_image_tokens} image tokens but no image_grid_thw was given")
  if image_grid_thw is not None:
    grids = np.asarray(image_grid_thw)
    expected = int(np.sum(np.prod(grids, axis=-1))) // cfg.vision.spatial_merge_size**2
    if num_image_tokens != expected:
      raise ValueError(f"input_ids hold {num_image_tokens} image tokens (id {cfg.image_token_id}) but "
                       f"image_grid_thw {grids.tolist()} gives {expected} merged patches")
  inputs: dict[str, Any] = {
      "input_ids": input_ids.astype(np.int32),
      "attention_mask": attention_mask.astype(np.int32),
      "position_ids": position_ids_for(cfg, input_ids, attention_mask, image_grid_thw),
  }
  if image_grid_thw is None:
    return inputs
  inputs["vision"] = geometry_fn(grids, cfg.vision)
  if pixel_values is not None:
    inputs["pixel_values"] = np.asarray(pixel_values, dtype=np.float32)
  return inputs


def _jitted_forward(graphdef: nnx.GraphDef, state: nnx.State, inputs: dict[str, Any]) -> Qwen25VLOutput:
  return nnx.merge(graphdef, state).forward(inputs)


# One cache for all models: keyed by the graph definition (static) and the input shapes / dtypes / shardings.
jitted_forward = jax.jit(_jitted_forward, static_argnums=0)


class Qwen25VLModel(nnx.Module):
  """Qwen2_5_VLForConditionalGeneration: `visual`, `language_model` and (untied) `lm_head`."""

  def __init__(self, cfg: Qwen25VLConfig, *, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike = jnp.float32,
               rngs: nnx.Rngs):
    if cfg.vision.out_hidden_size != cfg.text.hidden_size:
      raise ValueError(f"vision out_hidden_size {cfg.vision.out_hidden_size} != text hidden_size "
                       f"{cfg.text.hidden_size}")
    self.cfg = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    remat.check(cfg.remat)
    self.visual = VisionTransformer(cfg.vision, remat=cfg.remat, **kw)
    self.language_model = TextModel(cfg.text, remat=cfg.remat, **kw)
    if not cfg.tie_word_embeddings:
      self.lm_head = nnx.Linear(cfg.text.hidden_size, cfg.text.vocab_size, use_bias=False, **kw)

  def prepare(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
              image_grid_thw: np.ndarray | None = None, pixel_values: np.ndarray | None = None) -> dict[str, Any]:
    """Host-side inputs of `forward`: ids, mask, position ids (3, B, L) and, with images, the vision geometry and
    pixel values (a caller that adds "pixel_values" itself may leave them out here)."""
    return prepare_inputs(self.cfg, vision_geometry, input_ids, attention_mask, image_grid_thw, pixel_values)

  def embed_inputs(self, inputs: dict[str, Any]) -> jax.Array:
    """Token embeddings with the vision tower's output scattered into the image-pad positions, (B, L, H)."""
    input_ids = inputs["input_ids"]
    x = self.language_model.embed_tokens(input_ids)
    if "vision" in inputs:
      image_embeds = self.visual(inputs["pixel_values"], inputs["vision"])
      x = scatter_image_embeds(x, input_ids == self.cfg.image_token_id, image_embeds)
    return x

  def hidden_states(self, inputs: dict[str, Any], cache=None):
    """Final hidden states (after the last norm), without the (B, L, vocab) logits: what embedding models need.
    With a `generate.kv_cache.KVCache` (a prefill) the tokens go into it: returns (hidden states, cache)."""
    return self.language_model(self.embed_inputs(inputs), inputs["position_ids"], inputs["attention_mask"],
                                cache=cache)

  def forward(self, inputs: dict[str, Any]) -> Qwen25VLOutput:
    """Pure forward over `prepare`'s dict (with "pixel_values" whenever it has "vision")."""
    hidden = self.hidden_states(inputs)
    return Qwen25VLOutput(logits=self.logits(hidden), hidden_states=hidden)

  def logits(self, hidden: jax.Array) -> jax.Array:
    if self.cfg.tie_word_embeddings:
      return self.language_model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def __call__(self, *, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
               pixel_values: np.ndarray | None = None, image_grid_thw: np.ndarray | None = None) -> Qwen25VLOutput:
    """The HF processor's arrays in, logits and final hidden states out; the forward is jitted per shape bucket."""
    if image_grid_thw is not None and pixel_values is None:
      raise ValueError("image_grid_thw given without pixel_values")
    inputs = self.prepare(input_ids, attention_mask, image_grid_thw, pixel_values)
    graphdef, state = nnx.split(self)
    return jitted_forward(graphdef, state, inputs)
