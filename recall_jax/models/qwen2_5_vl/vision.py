"""The Qwen2.5-VL vision tower in Flax NNX, faithful to transformers' `Qwen2_5_VisionTransformerPretrainedModel`.

Input: the processor's flattened patches (N, C*T*P*P) and `vision_geometry(image_grid_thw, cfg)` (host numpy,
as jax arrays). Output: (N // merge**2, out_hidden_size) merged tokens in the processor's order, i.e. what
`model.visual(pixel_values, grid_thw).pooler_output` returns.

Window attention without a dense mask: tokens stay in processor order; each attention block gathers them into
padded windows (or, for `fullatt_block_indexes`, one padded row per image frame), runs
`jax.nn.dot_product_attention` with the rows as the batch and `key_value_seq_lengths` masking the padding, and
reads every token back from its slot. Rows hold tokens in transformers' window-permuted order.

Dtypes: params in `param_dtype`, matmuls in `dtype`; RMSNorm, rotary and softmax in fp32 as transformers does.

Parameter paths (nnx.state) and the Hugging Face keys they come from (prefix `visual.` on disk,
`model.visual.` in transformers-5 memory); Linear kernels are torch weight.T:
  patch_embed.proj.kernel        <- patch_embed.proj.weight, (hidden, C, T, P, P).reshape(hidden, -1).T
  blocks.{i}.norm1.weight        <- blocks.{i}.norm1.weight          (same for norm2)
  blocks.{i}.attn.qkv.kernel     <- blocks.{i}.attn.qkv.weight.T     (.bias <- .bias; same for attn.proj)
  blocks.{i}.mlp.{gate_proj,up_proj,down_proj}.kernel / .bias <- blocks.{i}.mlp.{...}.weight.T / .bias
  merger.ln_q.weight             <- merger.ln_q.weight
  merger.mlp.0.kernel / .bias    <- merger.mlp.0.weight.T / .bias    (same for merger.mlp.2; mlp.1 is the GELU)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from recall_jax.models import remat as remat_lib
from recall_jax.models.qwen2_5_vl.config import VisionConfig
from recall_jax.models.qwen2_5_vl.layers import RMSNorm, SwiGLUMLP
from recall_jax.models.qwen2_5_vl.rope import rotate_half

GEOMETRY_KEYS = ("rotary_pos", "window_gather", "window_lengths", "window_scatter", "full_gather",
                 "full_lengths", "full_scatter")


def rotary_cos_sin(rotary_pos: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """2-D rotary tables (N, head_dim) in fp32: [h freqs, w freqs] twice, as Qwen2_5_VLVisionRotaryEmbedding."""
  spatial_dim = head_dim // 2
  inv_freq = 1.0 / (theta**(jnp.arange(0, spatial_dim, 2, dtype=jnp.float32) / spatial_dim))
  freqs = rotary_pos.astype(jnp.float32)[..., None] * inv_freq  # (N, 2, head_dim // 4)
  freqs = freqs.reshape(freqs.shape[0], -1)  # (N, head_dim // 2): h block then w block
  freqs = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(freqs), jnp.sin(freqs)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """transformers' apply_rotary_pos_emb_vision for one of q / k: (N, heads, head_dim), rotated in fp32."""
  x32 = x.astype(jnp.float32)
  cos, sin = cos[:, None, :], sin[:, None, :]
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, gather: jax.Array, lengths: jax.Array,
                      scatter: jax.Array) -> jax.Array:
  """Attention within padded segments (windows or frames). q, k, v: (N, heads, head_dim) -> (N, heads*head_dim).

  gather (S, L) token ids per segment slot, lengths (S,) valid prefix per segment, scatter (N,) flat slot per
  token. Padded slots are excluded as keys; their query rows are computed and dropped.
  """
  qs, ks, vs = (jnp.take(t, gather, axis=0) for t in (q, k, v))  # (S, L, heads, head_dim)
  out = jax.nn.dot_product_attention(qs, ks, vs, scale=q.shape[-1]**-0.5, key_value_seq_lengths=lengths)
  out = out.reshape(-1, q.shape[1] * q.shape[2])
  return jnp.take(out, scatter, axis=0)


class VisionAttention(nnx.Module):
  """Fused qkv (bias) -> 2-D rotary on q, k -> segment attention -> proj (bias)."""

  def __init__(self, dim: int, num_heads: int, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"vision hidden_size {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, gather: jax.Array, lengths: jax.Array,
               scatter: jax.Array) -> jax.Array:
    n = x.shape[0]
    qkv = self.qkv(x).reshape(n, 3, self.num_heads, -1)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return self.proj(segment_attention(q, k, v, gather, lengths, scatter))


class VisionBlock(nnx.Module):
  """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

  def __init__(self, cfg: VisionConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads, **kw)
    self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, use_bias=True, **kw)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, gather: jax.Array, lengths: jax.Array,
               scatter: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x), cos, sin, gather, lengths, scatter)
    return x + self.mlp(self.norm2(x))


class ExactGELU(nnx.Module):
  """torch.nn.GELU() (erf form); a module only so merger.mlp indices match the HF nn.Sequential."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


class PatchMerger(nnx.Module):
  """ln_q over hidden, concatenate each merge**2 consecutive tokens, then Linear -> GELU -> Linear."""

  def __init__(self, cfg: VisionConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.merged_dim = cfg.hidden_size * cfg.spatial_merge_size**2
    self.ln_q = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.mlp = nnx.List([
        nnx.Linear(self.merged_dim, self.merged_dim, **kw),
        ExactGELU(),
        nnx.Linear(self.merged_dim, cfg.out_hidden_size, **kw),
    ])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.ln_q(x).reshape(-1, self.merged_dim)
    for layer in self.mlp:
      x = layer(x)
    return x


class PatchEmbed(nnx.Module):
  """Conv3d with kernel = stride = (T, P, P) and no bias, written as the identical matmul over flat patches."""

  def __init__(self, cfg: VisionConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
    self.proj = nnx.Linear(cfg.patch_dim, cfg.hidden_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    return self.proj(pixel_values)


class VisionTransformer(nnx.Module):
  """Qwen2.5-VL vision tower: patch embed -> blocks (window / full attention) -> patch merger."""

  def __init__(self, cfg: VisionConfig, *, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike = jnp.float32,
               remat: str = "none", rngs: nnx.Rngs):
    bad = [i for i in cfg.fullatt_block_indexes if not 0 <= i < cfg.depth]
    if bad:
      raise ValueError(f"vision fullatt_block_indexes {bad} out of range for depth {cfg.depth}")
    if cfg.head_dim % 4:
      raise ValueError(f"vision head_dim {cfg.head_dim} must be a multiple of 4 for the 2-D rotary embedding")
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat_lib.check(remat)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = PatchEmbed(cfg, **kw)
    self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, **kw)

  def __call__(self, pixel_values: jax.Array, geometry: dict[str, jax.Array]) -> jax.Array:
    missing = [k for k in GEOMETRY_KEYS if k not in geometry]
    if missing:
      raise ValueError(f"vision geometry: missing keys {missing}; build it with vision_geometry()")
    n = geometry["rotary_pos"].shape[0]
    if pixel_values.shape != (n, self.cfg.patch_dim):
      raise ValueError(f"pixel_values: expected shape ({n}, {self.cfg.patch_dim}) for these image grids, "
                       f"got {pixel_values.shape}")
    cos, sin = rotary_cos_sin(geometry["rotary_pos"], self.cfg.head_dim, self.cfg.rope_theta)
    window = tuple(geometry[f"window_{k}"] for k in ("gather", "lengths", "scatter"))
    full = tuple(geometry[f"full_{k}"] for k in ("gather", "lengths", "scatter"))
    x = self.patch_embed(pixel_values.astype(self.dtype))
    for i, block in enumerate(self.blocks):
      x = remat_lib.call(block, self.remat, x, cos, sin, *(full if i in self.cfg.fullatt_block_indexes else window))
    return self.merger(x)
