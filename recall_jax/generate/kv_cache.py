"""The key/value cache of the Qwen2.5-VL decoder: a fixed number of slots, written in place at one index.

Per layer it holds the rotated keys and the values of every slot (B, S, kv_heads, head_dim); a (B, S) mask says
which slots hold real tokens, and `index` is the next slot to write, the same for every row. Prompts are left
padded, so a prefill writes all rows' prompts into slots [0, P) and the n-th new token of every row goes into slot
P + n: one `dynamic_update_slice` per layer and call, no per-row scatter, and shapes that never change, so a
jitted loop over the cache compiles once per (batch, slots). The decoder itself (`TextModel(..., cache=cache)`)
reads and writes the cache; nothing here runs a layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.typing import DTypeLike

from recall_jax.models.qwen2_5_vl.config import TextConfig


@struct.dataclass
class LayerCache:
  k: jax.Array  # (B, S, kv_heads, head_dim), after rotary
  v: jax.Array  # (B, S, kv_heads, head_dim)

  def write(self, k: jax.Array, v: jax.Array, index: jax.Array) -> LayerCache:
    """Puts k / v (B, T, kv_heads, head_dim) into slots [index, index + T)."""
    start = (0, index, 0, 0)
    return LayerCache(k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), start),
                      v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), start))


@struct.dataclass
class KVCache:
  layers: tuple[LayerCache, ...]
  mask: jax.Array  # (B, S) bool: the slot holds a real token
  index: jax.Array  # () int32: the first unwritten slot

  @property
  def length(self) -> int:
    return self.mask.shape[1]

  def written_mask(self, attention_mask: jax.Array) -> jax.Array:
    """The (B, S) slot mask once the T new tokens of attention_mask (B, T) are in slots [index, index + T)."""
    return jax.lax.dynamic_update_slice(self.mask, attention_mask.astype(bool), (0, self.index))


def init(cfg: TextConfig, batch: int, length: int, dtype: DTypeLike) -> KVCache:
  """An empty cache of `length` slots for `batch` rows; `dtype` is the decoder's compute dtype (its keys')."""
  shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
  layer = lambda: LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
  return KVCache(layers=tuple(layer() for _ in range(cfg.num_hidden_layers)),
                 mask=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))
