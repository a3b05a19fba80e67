"""The Qwen3 decoder of Qwen3-VL in Flax NNX (transformers' Qwen3VLTextModel, 5.23).

What differs from the Qwen2.5-VL decoder (recall_jax.models.qwen2_5_vl.text), whose masks, KV-cache protocol,
RMSNorm and SwiGLU MLP this reuses: q/k/v/o without bias (config attention_bias), an explicit head_dim, an RMSNorm
over head_dim on every query and key head before the rotary embedding, interleaved M-RoPE sections, and DeepStack:
the vision tower's DeepStack features are added to the visual positions after decoder layers 0, 1, ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from recall_jax.models import remat as remat_lib
from recall_jax.models.qwen2_5_vl import rope
from recall_jax.models.qwen2_5_vl import text as qwen2_5_text
from recall_jax.models.qwen2_5_vl.layers import RMSNorm
from recall_jax.models.qwen2_5_vl.text import causal_mask, causal_padding_mask
from recall_jax.models.qwen3_vl.config import TextConfig

if TYPE_CHECKING:
  from recall_jax.generate.kv_cache import KVCache, LayerCache


def interleaved_streams(mrope_section: Sequence[int], half: int) -> np.ndarray:
  """Which position stream (0 = t, 1 = h, 2 = w) each of the `half` rotary frequencies reads: transformers'
  Qwen3VLTextRotaryEmbedding.recomposition_frequencies (slice(dim, 3 * section[dim], 3) takes stream dim)."""
  if len(mrope_section) != 3:
    raise ValueError(f"text mrope_section must have 3 entries (t, h, w), got {tuple(mrope_section)}")
  streams = np.zeros((half,), np.int32)
  for dim in (1, 2):
    streams[dim:mrope_section[dim] * 3:3] = dim
  return streams


class Attention(nnx.Module):
  """Grouped-query self-attention with per-head q/k RMSNorm."""

  def __init__(self, cfg: TextConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
    if cfg.num_attention_heads % cfg.num_key_value_heads:
      raise ValueError(f"text num_attention_heads {cfg.num_attention_heads} not a multiple of num_key_value_heads "
                       f"{cfg.num_key_value_heads}")
    self.num_heads = cfg.num_attention_heads
    self.num_kv_heads = cfg.num_key_value_heads
    self.head_dim = cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    linear = lambda i, o: nnx.Linear(i, o, use_bias=cfg.attention_bias, **kw)
    self.q_proj = linear(cfg.hidden_size, self.num_heads * self.head_dim)
    self.k_proj = linear(cfg.hidden_size, self.num_kv_heads * self.head_dim)
    self.v_proj = linear(cfg.hidden_size, self.num_kv_heads * self.head_dim)
    self.o_proj = linear(self.num_heads * self.head_dim, cfg.hidden_size)
    self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, **kw)
    self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, **kw)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: LayerCache | None = None,
               index: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
    """As the Qwen2.5-VL decoder's Attention: without a cache `mask` is (B, 1, T, T); with one, the rotated keys /
    values go into slots [index, index + T) and `mask` (B, 1, T, S) covers every slot."""
    b, t, _ = x.shape
    q = self.q_norm(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim))
    k = self.k_norm(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim))
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
    if cache is not None:
      cache = cache.write(k, v, index)
      k, v = cache.k, cache.v
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache


class DecoderLayer(qwen2_5_text.DecoderLayer):
  """Qwen2.5-VL's pre-norm block (norms, SwiGLU MLP, residuals) with the q/k-normed attention."""

  attention_cls = Attention


class TextModel(nnx.Module):
  """Token embedding, decoder layers (with DeepStack additions) and the final RMSNorm."""

  def __init__(self, cfg: TextConfig, *, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike = jnp.float32,
               remat: str = "none", rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat_lib.check(remat)
    self.streams = tuple(int(s) for s in interleaved_streams(cfg.mrope_section, cfg.head_dim // 2))  # static
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
    self.layers = nnx.List([DecoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

  def rotary(self, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, L, head_dim) for position_ids (3, B, L)."""
    return rope.stream_cos_sin(position_ids, np.asarray(self.streams), head_dim=self.cfg.head_dim, theta=self.cfg.rope_theta,
                               dtype=self.dtype)

  def __call__(self, inputs_embeds: jax.Array, position_ids: jax.Array, attention_mask: jax.Array,
               cache: KVCache | None = None, deepstack: Sequence[jax.Array] = ()) -> jax.Array | tuple[jax.Array, KVCache]:
    """inputs_embeds (B, T, H), position_ids (3, B, T), attention_mask (B, T) -> final-norm hidden states (B, T, H);
    deepstack[i] (B, T, H), zero off the visual positions, is added after layer i. With a cache as the Qwen2.5-VL
    decoder: returns (hidden states, the updated cache)."""
    if len(deepstack) > len(self.layers):
      raise ValueError(f"{len(deepstack)} DeepStack features for a decoder of {len(self.layers)} layers")
    length = attention_mask.shape[-1]
    cos, sin = self.rotary(position_ids)
    x = inputs_embeds.astype(self.dtype)
    if cache is None:
      mask, index, layer_caches = causal_padding_mask(attention_mask), None, (None,) * len(self.layers)
    else:
      if length > cache.length:
        raise ValueError(f"a KV cache of {cache.length} slots cannot take {length} tokens")
      valid, index, layer_caches = cache.written_mask(attention_mask), cache.index, cache.layers
      mask = causal_mask(valid, index + jnp.arange(length))
    written = []
    for i, (layer, layer_cache) in enumerate(zip(self.layers, layer_caches, strict=True)):
      if cache is None:
        x, _ = remat_lib.call(layer, self.remat, x, cos, sin, mask)
      else:
        x, layer_cache = layer(x, cos, sin, mask, layer_cache, index)
        written.append(layer_cache)
      if i < len(deepstack):
        x = x + deepstack[i].astype(x.dtype)
    x = self.norm(x)
    if cache is None:
      return x
    return x, cache.replace(layers=tuple(written), mask=valid, index=index + length)
