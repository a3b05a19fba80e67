"""The Qwen2 decoder of Qwen2.5-VL in Flax NNX: GQA attention with q/k/v biases and M-RoPE, RMSNorm, SwiGLU.

Attribute paths mirror the Hugging Face names (embed_tokens, layers[i].self_attn.q_proj, ..., norm) so the loader
is a name map. Attention is split into projection, rotation and attention steps so a KV cache can slot in between
for decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from recall_jax.models.qwen2_5_vl import rope
from recall_jax.models.qwen2_5_vl.config import TextConfig
from recall_jax.models.qwen2_5_vl.layers import RMSNorm, SwiGLUMLP


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
  """(B, 1, L, L) bool: query q sees key k when k <= q and k is a real token.

  A padding query also sees itself, so its (unused) row never softmaxes over an empty set and stays finite.
  """
  length = attention_mask.shape[-1]
  valid = attention_mask.astype(bool)
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  eye = jnp.eye(length, dtype=bool)
  return (causal[None] & (valid[:, None, :] | eye[None]))[:, None]


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

  def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (B, L, H) -> q (B, L, heads, D), k and v (B, L, kv_heads, D), before rotation."""
    b, l, _ = x.shape
    q = self.q_proj(x).reshape(b, l, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
    return q, k, v

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention of q (B, T, heads, D) over k / v (B, S, kv_heads, D) with a (B, 1, T, S) bool mask;
    returns the o_proj output (B, T, H)."""
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    b, t = out.shape[:2]
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    q, k, v = self.project(x)
    q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
    return self.attend(q, k, v, mask)


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: TextConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.self_attn = Attention(cfg, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, use_bias=False, **kw)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
    return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nnx.Module):
  """Token embedding, decoder layers and the final RMSNorm (transformers' Qwen2_5_VLTextModel)."""

  def __init__(self, cfg: TextConfig, *, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike = jnp.float32,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
    self.layers = nnx.List([DecoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

  def rotary(self, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, L, head_dim) for position_ids (3, B, L)."""
    return rope.mrope_cos_sin(position_ids, head_dim=self.cfg.head_dim, theta=self.cfg.rope_theta,
                              mrope_section=self.cfg.mrope_section, dtype=self.dtype)

  def __call__(self, inputs_embeds: jax.Array, position_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """inputs_embeds (B, L, H), position_ids (3, B, L), attention_mask (B, L) -> final-norm hidden states."""
    cos, sin = self.rotary(position_ids)
    mask = causal_padding_mask(attention_mask)
    x = inputs_embeds.astype(self.dtype)
    for layer in self.layers:
      x = layer(x, cos, sin, mask)
    return self.norm(x)
