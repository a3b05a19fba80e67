"""The retrieval embedding of a Qwen2.5-VL forward: the final-norm hidden state at the last token of the prompt (the
appended <|endoftext|>), L2-normalised, in fp32. Pure functions, shared by training, evaluation and the Embedder."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def pool_last_token(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """hidden (B, L, H) -> (B, H) at each row's last real token (works for left and right padding)."""
  length = attention_mask.shape[1]
  last = length - 1 - jnp.argmax(attention_mask[:, ::-1].astype(jnp.int32), axis=1)
  return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def embed(model, inputs: dict[str, Any]) -> jax.Array:
  """Pure: `model.prepare` inputs -> (B, H) unit-norm fp32 embeddings. Jittable; differentiable for training."""
  hidden = model.hidden_states(inputs)
  return l2_normalize(pool_last_token(hidden, inputs["attention_mask"]))


def side_inputs(model, batch: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
  """Host side: one side (`query` / `target`) of a pipeline batch -> the model's `prepare` inputs.

  Pipeline batches hold one image per example, padded to the largest bucket: (B, P, patch_dim). All images of a
  batch must share one grid (one bucket per batch) so the patch rows concatenate without padding.
  """
  grids = np.asarray(batch[f"{prefix}_image_grid_thw"])
  if not np.all(grids == grids[:1]):
    raise ValueError(f"{prefix}_image_grid_thw: a batch must hold one image bucket, got grids "
                     f"{sorted(set(map(tuple, grids.tolist())))}")
  pixels = np.asarray(batch[f"{prefix}_pixel_values"])
  patches = int(np.prod(grids[0]))
  pixel_values = pixels[:, :patches].reshape(-1, pixels.shape[-1])
  return model.prepare(batch[f"{prefix}_input_ids"], batch[f"{prefix}_attention_mask"], grids, pixel_values)
