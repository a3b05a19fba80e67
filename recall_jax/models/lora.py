"""LoRA and DoRA adapters for Flax NNX models, with PEFT semantics (PEFT files: `recall_jax.models.peft_io`).

`apply_lora` replaces the `nnx.Linear` submodules whose dotted module path fully matches a regex with `LoRALinear`,
in place. The base `kernel` / `bias` Variables are carried over unchanged (same paths, dtype and sharding), so
loaders and sharding rules written for the plain model keep working. Adapter weights are `nnx.LoRAParam`, a
subclass of `nnx.Param`:

  trainable = nnx.LoRAParam                                  # e.g. nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  frozen base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

Math (PEFT `peft.tuners.lora`, s = alpha / rank, NNX kernels are (in, out) = torch weight.T):
  LoRA: y = x W + b + s * dropout(x) A B
  DoRA: c = m / ||W + s A B||  per output feature, the norm detached from the gradient (DoRA paper sec. 4.3);
        without active dropout  y = c * (x W + s x A B) + b;
        with active dropout     y = x W + b + (c - 1) * (x' W) + c * s * x' A B,  x' = dropout(x),
        which is exactly how peft computes it (the base output stays undropped).
"""

from __future__ import annotations

import re
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx

LoRAInit = Literal["gaussian", "kaiming"]
INITS: tuple[str, ...] = get_args(LoRAInit)


class LoRALinear(nnx.Module):
  """An `nnx.Linear` with a LoRA (optionally DoRA) adapter; built from an existing `nnx.Linear`."""

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, dropout: float = 0.0, use_dora: bool = False,
               init: LoRAInit = "kaiming", adapter_dtype=jnp.float32, rngs: nnx.Rngs):
    if rank <= 0:
      raise ValueError(f"LoRA rank must be positive, got {rank}")
    if init not in INITS:
      raise ValueError(f"LoRA init must be one of {INITS}, got {init!r}")
    self.kernel = base.kernel
    self.bias = base.bias
    self.in_features = base.in_features
    self.out_features = base.out_features
    self.use_bias = base.use_bias
    self.dtype = base.dtype
    self.param_dtype = base.param_dtype
    self.precision = base.precision
    self.dot_general = base.dot_general
    self.promote_dtype = base.promote_dtype
    self.preferred_element_type = base.preferred_element_type
    self.rank = rank
    self.alpha = alpha
    self.scaling = alpha / rank
    self.use_dora = use_dora
    self.dropout_rate = dropout
    key = rngs.params()
    if init == "gaussian":  # peft init_lora_weights="gaussian": normal with std 1 / r.
      a = jax.random.normal(key, (self.in_features, rank), adapter_dtype) / rank
    else:  # peft default: torch kaiming_uniform_(a=sqrt(5)) on (r, in), i.e. U(-1/sqrt(in), 1/sqrt(in)).
      bound = 1.0 / self.in_features**0.5
      a = jax.random.uniform(key, (self.in_features, rank), adapter_dtype, -bound, bound)
    self.lora_a = nnx.LoRAParam(a)
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, self.out_features), adapter_dtype))
    if use_dora:
      # m = ||W + s A B|| = ||W|| at init since B = 0.
      self.lora_magnitude = nnx.LoRAParam(self.adapted_weight_norm().astype(adapter_dtype))
    else:
      self.lora_magnitude = nnx.data(None)
    # Without dropout the layer holds no RNG stream (no extra state to carry through jit).
    self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)

  def adapted_weight_norm(self) -> jax.Array:
    """||W + s A B|| per output feature, fp32, without gradient.

    Expanded as ||W||^2 + 2 s <A^T W, B> + s^2 B^T (A^T A) B so that the (in, out) sum is never materialised.
    """
    w = jax.lax.stop_gradient(self.kernel[...])
    a = jax.lax.stop_gradient(self.lora_a[...]).astype(jnp.float32)
    b = jax.lax.stop_gradient(self.lora_b[...]).astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    w_sq = jnp.sum(jnp.square(w.astype(jnp.float32)), axis=0)
    a_t_w = jnp.einsum("ir,io->ro", a.astype(w.dtype), w, preferred_element_type=jnp.float32, precision=hp)
    cross = jnp.sum(b * a_t_w, axis=0)
    gram_b = jnp.einsum("rk,ko->ro", a.T @ a, b, precision=hp)
    lora_sq = jnp.sum(b * gram_b, axis=0)
    s = self.scaling
    return jnp.sqrt(jnp.maximum(w_sq + 2 * s * cross + s * s * lora_sq, 0.0))

  def _dot(self, x: jax.Array, w: jax.Array) -> jax.Array:
    kwargs = {}
    if self.preferred_element_type is not None:
      kwargs["preferred_element_type"] = self.preferred_element_type
    return self.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision, **kwargs)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    # The adapter runs in the base layer's compute dtype (bf16 base -> bf16 matmuls, fp32 adapter params).
    a = self.lora_a[...].astype(x.dtype)
    b = self.lora_b[...].astype(x.dtype)
    dropout_active = self.dropout.rate > 0 and not self.dropout.deterministic
    x_drop = self.dropout(x) if dropout_active else x
    lora = self._dot(self._dot(x_drop, a), b) * jnp.asarray(self.scaling, x.dtype)
    base = self._dot(x, kernel)
    if not self.use_dora:
      y = base + lora
    else:
      scale = (self.lora_magnitude[...].astype(jnp.float32) / self.adapted_weight_norm()).astype(x.dtype)
      if dropout_active:
        y = base + (scale - 1) * self._dot(x_drop, kernel) + scale * lora
      else:
        y = scale * (base + lora)
    if bias is not None:
      y = y + bias
    return y

  def merged_kernel(self) -> jax.Array:
    """The base kernel with the adapter folded in, in the base parameter dtype."""
    w = self.kernel[...].astype(jnp.float32)
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    merged = w + self.scaling * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    if self.use_dora:
      merged = merged * (self.lora_magnitude[...].astype(jnp.float32) / self.adapted_weight_norm())
    return merged.astype(self.kernel[...].dtype)


def _module_path(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def _set_child(model: nnx.Module, path: tuple, child: nnx.Module) -> None:
  parent = model
  for part in path[:-1]:
    parent = parent[part] if isinstance(part, int) else getattr(parent, part)
  if isinstance(path[-1], int):
    parent[path[-1]] = child
  else:
    setattr(parent, path[-1], child)


def lora_modules(model: nnx.Module) -> dict[str, LoRALinear]:
  """The adapted modules of `model` by dotted module path."""
  return {_module_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)}


def apply_lora(model: nnx.Module, target_regex: str, *, rank: int, alpha: float,
               dropout: float = 0.0, use_dora: bool = False, init: LoRAInit = "kaiming", adapter_dtype=jnp.float32,
               rngs: nnx.Rngs) -> list[str]:
  """Replaces, in place, every `nnx.Linear` whose dotted path fully matches `target_regex` with a `LoRALinear`.

  Returns the adapted module paths (sorted). Raises ValueError when nothing matches, when a matching module is
  not an `nnx.Linear`, or when it already carries an adapter.
  """
  pattern = re.compile(target_regex)
  targets = []
  for path, module in nnx.iter_modules(model):
    name = _module_path(path)
    if not path or not pattern.fullmatch(name):
      continue
    if isinstance(module, LoRALinear):
      raise ValueError(f"apply_lora: module {name!r} already has a LoRA adapter")
    if type(module) is not nnx.Linear:
      raise ValueError(f"apply_lora: target regex {target_regex!r} matches {name!r}, a {type(module).__name__}, "
                       "not an nnx.Linear")
    targets.append((path, module))
  if not targets:
    raise ValueError(f"apply_lora: target regex {target_regex!r} matches no module of {type(model).__name__}")
  for path, module in targets:
    _set_child(model, path, LoRALinear(module, rank=rank, alpha=alpha, dropout=dropout, use_dora=use_dora, init=init,
                                       adapter_dtype=adapter_dtype, rngs=rngs))
  return sorted(_module_path(p) for p, _ in targets)


def merge_lora(model: nnx.Module) -> list[str]:
  """Folds every adapter into its base kernel (DoRA included) and restores plain `nnx.Linear` modules, in place."""
  merged = []
  for path, module in list(nnx.iter_modules(model)):
    if not isinstance(module, LoRALinear):
      continue
    kernel = module.merged_kernel()
    linear = nnx.eval_shape(lambda m=module: nnx.Linear(
        m.in_features, m.out_features, use_bias=m.use_bias, dtype=m.dtype, param_dtype=m.param_dtype,
        precision=m.precision, dot_general=m.dot_general, promote_dtype=m.promote_dtype,
        preferred_element_type=m.preferred_element_type, rngs=nnx.Rngs(0)))
    module.kernel[...] = kernel
    linear.kernel = module.kernel
    if module.use_bias:
      linear.bias = module.bias
    _set_child(model, path, linear)
    merged.append(_module_path(path))
  if not merged:
    raise ValueError(f"merge_lora: {type(model).__name__} has no LoRA adapters")
  return sorted(merged)
