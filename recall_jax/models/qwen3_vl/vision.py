"""The Qwen3-VL vision tower in Flax NNX, faithful to transformers' `Qwen3VLVisionModel` (5.23).

Input: the processor's flattened patches (N, C*T*P*P) and `vision_geometry(image_grid_thw, cfg)`. Output: the merged
tokens (N // merge**2, out_hidden_size) in processor order (`pooler_output`), and with `features` also the DeepStack
features, one (N // merge**2, out_hidden_size) array per `deepstack_visual_indexes` entry.

What differs from Qwen2.5-VL's tower: a Conv3d patch embedding with bias, plus a learned absolute position table
bilinearly resampled to each grid; LayerNorm (with bias) instead of RMSNorm; a plain fc1 -> GELU(tanh) -> fc2 MLP;
full attention within each frame in every block (no windows); a merger whose LayerNorm acts before the 2 x 2 merge,
and DeepStack mergers (LayerNorm after the merge) that read the hidden states after the listed blocks.

Parameter paths (prefix `visual.` in the NNX model, `model.visual.` in transformers' checkpoints); Linear kernels are
torch weight.T, the patch embedding's Conv3d weight is flattened first:
  patch_embed.proj.{kernel,bias}, pos_embed.embedding, blocks.{i}.{norm1,norm2}.{weight,bias},
  blocks.{i}.attn.{qkv,proj}.{kernel,bias}, blocks.{i}.mlp.{linear_fc1,linear_fc2}.{kernel,bias},
  merger.norm.{weight,bias}, merger.{linear_fc1,linear_fc2}.{kernel,bias}, deepstack_merger_list.{j}.(same).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from recall_jax.models import remat as remat_lib
from recall_jax.models.qwen2_5_vl.vision import VisionAttention, rotary_cos_sin
from recall_jax.models.qwen3_vl.config import VisionConfig
from recall_jax.models.qwen3_vl.vision_geometry import GEOMETRY_KEYS

_ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
                "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm over the last axis (weight and bias, HF names), computed in fp32 and cast back."""

  def __init__(self, dim: int, eps: float, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
    del rngs  # weight starts at one and bias at zero, as torch
    self.eps = eps
    self.dtype = dtype
    self.weight = nnx.Param(jnp.ones((dim,), dtype=param_dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype=param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    out = normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return out.astype(self.dtype)


class VisionMLP(nnx.Module):
  """linear_fc2(act(linear_fc1(x))), both with bias (Qwen3VLVisionMLP)."""

  def __init__(self, cfg: VisionConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
    if cfg.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"vision hidden_act {cfg.hidden_act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = cfg.hidden_act
    self.linear_fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
    self.linear_fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_fc2(_ACTIVATIONS[self.act](self.linear_fc1(x)))


class VisionBlock(nnx.Module):
  """x + attn(norm1(x)); x + mlp(norm2(x)), attention within each frame."""

  def __init__(self, cfg: VisionConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
    self.norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
    self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads, **kw)
    self.mlp = VisionMLP(cfg, **kw)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, gather: jax.Array, lengths: jax.Array,
               scatter: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x), cos, sin, gather, lengths, scatter)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """Qwen3VLVisionPatchMerger: LayerNorm (before the 2 x 2 merge, or after it: `postshuffle`), then
  linear_fc1 -> GELU (erf) -> linear_fc2 over the merged width."""

  def __init__(self, cfg: VisionConfig, *, postshuffle: bool, dtype: DTypeLike, param_dtype: DTypeLike,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.merged_dim = cfg.hidden_size * cfg.spatial_merge_size**2
    self.postshuffle = postshuffle
    self.norm = LayerNorm(self.merged_dim if postshuffle else cfg.hidden_size, cfg.layer_norm_eps, **kw)
    self.linear_fc1 = nnx.Linear(self.merged_dim, self.merged_dim, **kw)
    self.linear_fc2 = nnx.Linear(self.merged_dim, cfg.out_hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.postshuffle:
      x = self.norm(x.reshape(-1, self.merged_dim))
    else:
      x = self.norm(x).reshape(-1, self.merged_dim)
    return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class PatchEmbed(nnx.Module):
  """Conv3d with kernel = stride = (T, P, P) and a bias, written as the identical matmul over flat patches."""

  def __init__(self, cfg: VisionConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
    self.proj = nnx.Linear(cfg.patch_dim, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    return self.proj(pixel_values)


class VisionModel(nnx.Module):
  """Qwen3-VL vision tower: patch embed + resampled positions -> blocks -> merger, with DeepStack taps."""

  def __init__(self, cfg: VisionConfig, *, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike = jnp.float32,
               remat: str = "none", rngs: nnx.Rngs):
    bad = [i for i in cfg.deepstack_visual_indexes if not 0 <= i < cfg.depth]
    if bad:
      raise ValueError(f"vision deepstack_visual_indexes {bad} out of range for depth {cfg.depth}")
    if cfg.head_dim % 4:
      raise ValueError(f"vision head_dim {cfg.head_dim} must be a multiple of 4 for the 2-D rotary embedding")
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat_lib.check(remat)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = PatchEmbed(cfg, **kw)
    self.pos_embed = nnx.Embed(cfg.num_position_embeddings, cfg.hidden_size, **kw)
    self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, postshuffle=False, **kw)
    self.deepstack_merger_list = nnx.List(
        [PatchMerger(cfg, postshuffle=True, **kw) for _ in cfg.deepstack_visual_indexes])

  def features(self, pixel_values: jax.Array, geometry: dict[str, jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
    """(merged tokens (M, out), DeepStack features [(M, out)] in deepstack_visual_indexes order)."""
    missing = [k for k in GEOMETRY_KEYS if k not in geometry]
    if missing:
      raise ValueError(f"vision geometry: missing keys {missing}; build it with qwen3_vl vision_geometry()")
    n = geometry["rotary_pos"].shape[0]
    if pixel_values.shape != (n, self.cfg.patch_dim):
      raise ValueError(f"pixel_values: expected shape ({n}, {self.cfg.patch_dim}) for these image grids, "
                       f"got {pixel_values.shape}")
    x = self.patch_embed(pixel_values.astype(self.dtype))
    table = self.pos_embed.embedding[...]
    taps = jnp.take(table, geometry["pos_index"], axis=0)  # (N, 4, hidden)
    positions = jnp.sum(taps * geometry["pos_weight"][..., None].astype(taps.dtype), axis=1)
    x = x + positions.astype(x.dtype)
    cos, sin = rotary_cos_sin(geometry["rotary_pos"], self.cfg.head_dim, self.cfg.rope_theta)
    full = tuple(geometry[f"full_{k}"] for k in ("gather", "lengths", "scatter"))
    deepstack = []
    for i, block in enumerate(self.blocks):
      x = remat_lib.call(block, self.remat, x, cos, sin, *full)
      if i in self.cfg.deepstack_visual_indexes:
        deepstack.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
    return self.merger(x), deepstack

  def __call__(self, pixel_values: jax.Array, geometry: dict[str, jax.Array]) -> jax.Array:
    """The merged tokens alone (what the vision pretraining and any image-feature reader need)."""
    return self.features(pixel_values, geometry)[0]
