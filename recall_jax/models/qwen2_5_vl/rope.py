"""Multimodal rotary position embedding (M-RoPE) of the Qwen2.5-VL language model; pure, jittable functions.

Each of the head_dim / 2 rotary frequencies reads one of the three position streams (temporal, height, width):
`mrope_section` splits the frequencies into consecutive chunks and chunk i uses stream i % 3, exactly as
transformers' Qwen2_5_VLRotaryEmbedding.recomposition_frequencies. With the three streams equal (text only, or
position_mode="sequential") this is ordinary 1-D RoPE.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike


def inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """1 / theta^(2i / head_dim) for i < head_dim / 2, in float32 as transformers computes it."""
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def section_streams(mrope_section: Sequence[int]) -> np.ndarray:
  """For every rotary frequency, which position stream (0 = t, 1 = h, 2 = w) it reads."""
  return np.concatenate([np.full((n,), i % 3, dtype=np.int32) for i, n in enumerate(mrope_section)])


def mrope_cos_sin(position_ids: jax.Array, *, head_dim: int, theta: float, mrope_section: Sequence[int],
                  dtype: DTypeLike) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape (B, L, head_dim) from position_ids (3, B, L); computed in fp32, cast to `dtype`."""
  if sum(mrope_section) != head_dim // 2:
    raise ValueError(f"text mrope_section {tuple(mrope_section)} must sum to head_dim / 2 = {head_dim // 2}")
  return stream_cos_sin(position_ids, section_streams(mrope_section), head_dim=head_dim, theta=theta, dtype=dtype)


def stream_cos_sin(position_ids: jax.Array, streams: np.ndarray, *, head_dim: int, theta: float,
                   dtype: DTypeLike) -> tuple[jax.Array, jax.Array]:
  """cos, sin (B, L, head_dim) when rotary frequency j rotates by position stream streams[j] of (3, B, L)."""
  # (3, B, L) -> (B, L, head_dim / 2): the position each frequency rotates by.
  positions = jnp.moveaxis(position_ids[streams], 0, -1).astype(jnp.float32)
  freqs = positions * jnp.asarray(inv_freq(head_dim, theta))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x (B, L, heads, head_dim) by cos / sin (B, L, head_dim)."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return x * cos + rotate_half(x) * sin
