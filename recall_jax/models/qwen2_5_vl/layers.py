"""Small layers shared by the Qwen2.5-VL vision tower and text model: RMSNorm and the SwiGLU MLP.

Attribute and parameter names mirror the Hugging Face modules (`weight`; `gate_proj` / `up_proj` / `down_proj`) so
checkpoint loading is a name map; nnx.Linear kernels are (in, out) = torch weight.T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike


class RMSNorm(nnx.Module):
  """transformers' Qwen2RMSNorm: normalise in fp32, cast back to the input dtype, then scale by `weight`.

  The scale is applied after the cast (as transformers does), so a bf16 input is rounded to bf16 before the
  multiply; the result dtype is the promotion of the input dtype and the compute dtype.
  """

  def __init__(self, dim: int, eps: float = 1e-6, *, dtype: DTypeLike = jnp.float32,
               param_dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs):
    del rngs  # No random init: the scale starts at one, like transformers.
    self.eps = eps
    self.dtype = dtype
    self.weight = nnx.Param(jnp.ones((dim,), dtype=param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    input_dtype = x.dtype
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(input_dtype)
    return self.weight[...].astype(self.dtype) * normed


class SwiGLUMLP(nnx.Module):
  """down_proj(silu(gate_proj(x)) * up_proj(x)), as Qwen2_5_VLMLP (vision: with bias; text: without)."""

  def __init__(self, dim: int, hidden_dim: int, *, use_bias: bool, dtype: DTypeLike = jnp.float32,
               param_dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs):
    linear = lambda i, o: nnx.Linear(i, o, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = linear(dim, hidden_dim)
    self.up_proj = linear(dim, hidden_dim)
    self.down_proj = linear(hidden_dim, dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
