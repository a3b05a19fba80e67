"""A key/value cache for the Qwen2.5-VL decoder, and the decoder run over it: prefill and one-token steps.

The cache holds, per layer, the rotated keys and the values of every slot (B, S, kv_heads, head_dim) and a (B, S)
validity mask. Prompts are left padded, so every row writes its n-th new token into the same slot (prompt length
+ n): one `dynamic_update_slice` per layer and step, no per-row scatter. The layer math calls the model's own
submodules (input_layernorm, self_attn.project / attend, mlp, norm), so it cannot drift from the full forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from recall_jax.models.qwen2_5_vl import rope
from recall_jax.models.qwen2_5_vl.text import DecoderLayer, TextModel, causal_padding_mask


@struct.dataclass
class KVCache:
  k: tuple[jax.Array, ...]  # per layer (B, S, kv_heads, head_dim), after rotary
  v: tuple[jax.Array, ...]  # per layer (B, S, kv_heads, head_dim)
  mask: jax.Array  # (B, S) bool: the slot holds a real token

  @property
  def length(self) -> int:
    return self.mask.shape[1]


def _layer(layer: DecoderLayer, x: jax.Array, cos: jax.Array, sin: jax.Array,
           kv: tuple[jax.Array, jax.Array] | None, index: jax.Array | None,
           mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One pre-norm decoder block. Without `kv` it attends over its own keys (prefill); with `kv` it writes its keys
  / values into the cache at slot `index` and attends over the whole cache. Returns (x, keys, values)."""
  attn = layer.self_attn
  q, k, v = attn.project(layer.input_layernorm(x))
  q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
  if kv is not None:
    k_cache, v_cache = kv
    start = (0, index, 0, 0)
    k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
    v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
  x = x + attn.attend(q, k, v, mask)
  return x + layer.mlp(layer.post_attention_layernorm(x)), k, v


def prefill(lm: TextModel, inputs_embeds: jax.Array, position_ids: jax.Array, attention_mask: jax.Array,
            cache_length: int) -> tuple[jax.Array, KVCache]:
  """Runs the prompt (B, P, H) and returns the final-norm hidden states and a cache of `cache_length` >= P slots
  holding the prompt in slots [0, P)."""
  length = attention_mask.shape[1]
  if cache_length < length:
    raise ValueError(f"cache length {cache_length} is shorter than the prompt ({length} tokens)")
  cos, sin = lm.rotary(position_ids)
  mask = causal_padding_mask(attention_mask)
  x = inputs_embeds.astype(lm.dtype)
  pad = ((0, 0), (0, cache_length - length), (0, 0), (0, 0))
  ks, vs = [], []
  for layer in lm.layers:
    x, k, v = _layer(layer, x, cos, sin, None, None, mask)
    ks.append(jnp.pad(k, pad))
    vs.append(jnp.pad(v, pad))
  valid = jnp.pad(attention_mask.astype(bool), ((0, 0), (0, cache_length - length)))
  return lm.norm(x), KVCache(k=tuple(ks), v=tuple(vs), mask=valid)


def decode_step(lm: TextModel, inputs_embeds: jax.Array, position_ids: jax.Array, cache: KVCache,
                index: jax.Array) -> tuple[jax.Array, KVCache]:
  """One new token per row: inputs_embeds (B, 1, H) at position_ids (3, B, 1) goes into cache slot `index` (a
  scalar, the same for all rows) and attends over every valid slot up to it. Returns hidden (B, 1, H), cache."""
  batch = inputs_embeds.shape[0]
  valid = jax.lax.dynamic_update_slice(cache.mask, jnp.ones((batch, 1), bool), (0, index))
  # Slots after `index` are still unwritten (mask False), so the cache mask alone is causal.
  mask = valid[:, None, None, :]
  cos, sin = lm.rotary(position_ids)
  x = inputs_embeds.astype(lm.dtype)
  ks, vs = [], []
  for layer, k_cache, v_cache in zip(lm.layers, cache.k, cache.v):
    x, k, v = _layer(layer, x, cos, sin, (k_cache, v_cache), index, mask)
    ks.append(k)
    vs.append(v)
  return lm.norm(x), KVCache(k=tuple(ks), v=tuple(vs), mask=valid)
