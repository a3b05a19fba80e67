"""The Qwen2 decoder of Qwen2.5-VL in Flax NNX: GQA attention with q/k/v biases and M-RoPE, RMSNorm, SwiGLU.

Attribute paths mirror the Hugging Face names (embed_tokens, layers[i].self_attn.q_proj, ..., norm) so the loader
is a name map. One forward serves training and decoding: without a cache the tokens attend causally among
themselves; with a `generate.kv_cache.KVCache` they are written into the cache's next slots and attend over
every real slot up to their own (a prefill writes the prompt, a decode step one token per row).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from recall_jax.models import remat as remat_lib
from recall_jax.models.qwen2_5_vl import rope
from recall_jax.models.qwen2_5_vl.config import TextConfig
from recall_jax.models.qwen2_5_vl.layers import RMSNorm, SwiGLUMLP

if TYPE_CHECKING:  # Only for annotations: recall_jax.generate imports the model, not the other way round.
  from recall_jax.generate.kv_cache import KVCache, LayerCache


def causal_mask(key_valid: jax.Array, query_slots: jax.Array) -> jax.Array:
  """(B, 1, T, S) bool: the query in slot query_slots[t] sees key slot s when s <= that slot and key_valid (B, S)
  marks s as a real token.

  A padding query also sees itself, so its (unused) row never softmaxes over an empty set and stays finite.
  """
  slots = jnp.arange(key_valid.shape[-1])
  causal = slots[None, :] <= query_slots[:, None]
  own = slots[None, :] == query_slots[:, None]
  return (causal[None] & (key_valid.astype(bool)[:, None, :] | own[None]))[:, None]


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
  """(B, 1, L, L) bool for L tokens attending among themselves, attention_mask (B, L) marking the real ones."""
  return causal_mask(attention_mask, jnp.arange(attention_mask.shape[-1]))


class Attention(nnx.Module):
  """Grouped-query self-attention: q/k/v projections with bias, o_proj without."""

  def __init__(self, cfg: TextConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
    if cfg.hidden_size % cfg.num_attention_heads:
      raise ValueError(f"text hidden_size {cfg.hidden_size} not divisible by num_attention_heads "
                       f"{cfg.num_attention_heads}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
      raise ValueError(f"text num_attention_heads {cfg.num_attention_heads} not a multiple of num_key_value_heads "
                       f"{cfg.num_key_value_heads}")
    self.num_heads = cfg.num_attention_heads
    self.num_kv_heads = cfg.num_key_value_heads
    self.head_dim = cfg.head_dim
    linear = lambda i, o, bias: nnx.Linear(i, o, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(cfg.hidden_size, self.num_heads * self.head_dim, True)
    self.k_proj = linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, True)
    self.v_proj = linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, True)
    self.o_proj = linear(self.num_heads * self.head_dim, cfg.hidden_size, False)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: LayerCache | None = None,
               index: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
    """x (B, T, H) -> o_proj output (B, T, H) and the cache. Without a cache the keys are x's own and `mask` is
    (B, 1, T, T); with one, x's rotated keys / values go into slots [index, index + T) and `mask` (B, 1, T, S)
    covers every slot."""
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
    if cache is not None:
      cache = cache.write(k, v, index)
      k, v = cache.k, cache.v
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Qwen3-VL's layer is this one with its own
  `attention_cls`."""

  attention_cls = Attention

  def __init__(self, cfg: TextConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.self_attn = self.attention_cls(cfg, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, use_bias=False, **kw)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: LayerCache | None = None,
               index: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
    h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, index)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class TextModel(nnx.Module):
  """Token embedding, decoder layers and the final RMSNorm (transformers' Qwen2_5_VLTextModel)."""

  def __init__(self, cfg: TextConfig, *, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike = jnp.float32,
               remat: str = "none", rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat_lib.check(remat)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
    self.layers = nnx.List([DecoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

  def rotary(self, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, L, head_dim) for position_ids (3, B, L)."""
    return rope.mrope_cos_sin(position_ids, head_dim=self.cfg.head_dim, theta=self.cfg.rope_theta,
                              mrope_section=self.cfg.mrope_section, dtype=self.dtype)

  def __call__(self, inputs_embeds: jax.Array, position_ids: jax.Array, attention_mask: jax.Array,
               cache: KVCache | None = None) -> jax.Array | tuple[jax.Array, KVCache]:
    """inputs_embeds (B, T, H), position_ids (3, B, T), attention_mask (B, T) -> final-norm hidden states (B, T, H).

    With a cache the T tokens go into its slots [cache.index, cache.index + T) (attention_mask says which are
    real) and attend over every real slot up to their own; returns (hidden states, the updated cache).
    """
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
    if cache is None:  # the training / embedding forward
      for layer in self.layers:
        x, _ = remat_lib.call(layer, self.remat, x, cos, sin, mask)
      return self.norm(x)
    written = []
    for layer, layer_cache in zip(self.layers, layer_caches, strict=True):
      x, layer_cache = layer(x, cos, sin, mask, layer_cache, index)
      written.append(layer_cache)
    x = self.norm(x)
    return x, cache.replace(layers=tuple(written), mask=valid, index=index + length)
