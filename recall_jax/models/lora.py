"""LoRA and DoRA adapters for Flax NNX models, with PEFT semantics and PEFT adapter import/export.

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

import dataclasses
import json
import os
import re
from typing import Callable, Literal, get_args

import jax
import jax.numpy as jnp
import safetensors.flax
from flax import nnx

LoRAInit = Literal["gaussian", "kaiming"]
INITS: tuple[str, ...] = get_args(LoRAInit)

# The effective ReCALL target set: LLM q/k/v/o and down projections + the vision MLP down projection.
DEFAULT_TARGET_REGEX = (
    r"language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.down_proj)"
    r"|visual\.blocks\.\d+\.mlp\.down_proj")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


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


def apply_lora(model: nnx.Module, target_regex: str = DEFAULT_TARGET_REGEX, *, rank: int, alpha: float,
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


# ----------------------------------------------------------------------------------------------------------------
# PEFT interop.


@dataclasses.dataclass(frozen=True)
class PeftNames:
  """Maps NNX module paths to the module names of the PyTorch model peft wraps, and back."""
  to_hf: Callable[[str], str]
  from_hf: Callable[[str], str]


def _qwen_to_hf(path: str) -> str:
  if path.startswith(("language_model.", "visual.")):
    return "model." + path
  raise ValueError(f"no Hugging Face name for Qwen2.5-VL module path {path!r}")


def _qwen_from_hf(name: str) -> str:
  # transformers >= 4.52 names first, then the older layout (model.layers.*, visual.*) of adapters saved before.
  for prefix, replacement in (("model.language_model.", "language_model."), ("model.visual.", "visual."),
                              ("model.layers.", "language_model.layers."), ("visual.", "visual.")):
    if name.startswith(prefix):
      return replacement + name[len(prefix):]
  raise ValueError(f"unknown Qwen2.5-VL module name {name!r} in a peft adapter")


# Qwen2_5_VLForConditionalGeneration as peft 0.21 + transformers 5 name it: model.language_model.*, model.visual.*.
QWEN2_5_VL_NAMES = PeftNames(_qwen_to_hf, _qwen_from_hf)
# For modules whose NNX paths already equal the torch module names.
IDENTITY_NAMES = PeftNames(lambda p: p, lambda n: n)


def _uniform(modules: dict[str, LoRALinear], attr: str):
  values = {getattr(m, attr) for m in modules.values()}
  if len(values) != 1:
    raise ValueError(f"export_peft: adapters differ in {attr} ({sorted(values)}); peft needs one value")
  return values.pop()


def export_peft(model: nnx.Module, out_dir: str, *, base_model_name_or_path: str | None = None,
                names: PeftNames = QWEN2_5_VL_NAMES) -> None:
  """Writes adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads."""
  modules = lora_modules(model)
  if not modules:
    raise ValueError(f"export_peft: {type(model).__name__} has no LoRA adapters")
  hf_names = {path: names.to_hf(path) for path in modules}
  tensors = {}
  for path, m in modules.items():
    key = _PEFT_PREFIX + hf_names[path]
    tensors[f"{key}.lora_A.weight"] = jnp.asarray(m.lora_a[...]).T
    tensors[f"{key}.lora_B.weight"] = jnp.asarray(m.lora_b[...]).T
    if m.use_dora:
      tensors[f"{key}.lora_magnitude_vector"] = jnp.asarray(m.lora_magnitude[...])
  config = {
      "peft_type": "LORA",
      "task_type": None,
      "base_model_name_or_path": base_model_name_or_path,
      "r": _uniform(modules, "rank"),
      "lora_alpha": _uniform(modules, "alpha"),
      "lora_dropout": _uniform(modules, "dropout_rate"),
      "use_dora": _uniform(modules, "use_dora"),
      "use_rslora": False,
      "bias": "none",
      "fan_in_fan_out": False,
      "inference_mode": True,
      # Exact module names: peft matches list entries by equality (or dotted suffix).
      "target_modules": sorted(hf_names.values()),
  }
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  safetensors.flax.save_file({k: jnp.asarray(v) for k, v in tensors.items()}, os.path.join(out_dir, ADAPTER_WEIGHTS))


# peft config fields that change the model in ways this module does not implement (other LoRA variants, biases,
# per-module ranks, ...), with their neutral values.
_UNSUPPORTED = {"use_rslora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
                "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
                "exclude_modules": None, "modules_to_save": None, "target_parameters": None,
                "layer_replication": None, "trainable_token_indices": None, "use_qalora": False,
                "use_bdlora": None, "arrow_config": None, "alora_invocation_tokens": None, "velora_config": None,
                "monteclora_config": None, "kasa_config": None}


def _peft_targets(target_modules, hf_name: str) -> bool:
  """peft's module matching: a string is a full-match regex, a list matches by equality or dotted suffix."""
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, hf_name) is not None
  return any(hf_name == t or hf_name.endswith("." + t) for t in target_modules)


def import_peft(model: nnx.Module, adapter_dir: str, *, names: PeftNames = QWEN2_5_VL_NAMES,
                adapter_dtype=jnp.float32, rngs: nnx.Rngs | None = None) -> list[str]:
  """Adds the adapters of a peft LoRA/DoRA checkpoint to `model` (which must have none) and loads their weights.

  Target modules are chosen the way peft chooses them, from `target_modules` over the Hugging Face names of the
  model's `nnx.Linear` modules. Returns the adapted module paths.
  """
  config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
  weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
  for p in (config_path, weights_path):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"import_peft: missing {p}")
  with open(config_path) as f:
    config = json.load(f)
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
  for field, neutral in _UNSUPPORTED.items():
    if config.get(field) not in (None, neutral):
      raise ValueError(f"{config_path}: {field}={config[field]!r} is not supported")
  if config.get("init_lora_weights") == "mica":  # a forward-changing variant selected through the init field.
    raise ValueError(f"{config_path}: init_lora_weights='mica' is not supported")
  target_modules = config["target_modules"]
  if target_modules == "all-linear" or not target_modules:
    raise ValueError(f"{config_path}: target_modules={target_modules!r} is not supported")
  if lora_modules(model):
    raise ValueError("import_peft: the model already has LoRA adapters")

  paths = [_module_path(p) for p, m in nnx.iter_modules(model) if p and type(m) is nnx.Linear]
  hf_of = {}
  for path in paths:
    try:
      hf_of[path] = names.to_hf(path)
    except ValueError:
      continue  # a module the torch model has no name for cannot be a peft target.
  targets = [p for p, n in hf_of.items() if _peft_targets(target_modules, n)]
  if not targets:
    raise ValueError(f"{config_path}: target_modules={target_modules!r} matches no nnx.Linear of the model")
  apply_lora(model, "|".join(re.escape(p) for p in targets), rank=int(config["r"]), alpha=config["lora_alpha"],
             dropout=config.get("lora_dropout", 0.0), use_dora=bool(config.get("use_dora", False)),
             adapter_dtype=adapter_dtype, rngs=rngs if rngs is not None else nnx.Rngs(0))

  tensors = safetensors.flax.load_file(weights_path)
  # Key -> (module, attribute, transpose); file keys may use either Qwen layout, so resolve through from_hf.
  modules = lora_modules(model)
  expected = {}
  for key in tensors:
    if not key.startswith(_PEFT_PREFIX):
      raise ValueError(f"{weights_path}: unexpected key {key!r} (no {_PEFT_PREFIX!r} prefix)")
    for suffix, attr in ((".lora_A.weight", "lora_a"), (".lora_B.weight", "lora_b"),
                         (".lora_magnitude_vector.weight", "lora_magnitude"),
                         (".lora_magnitude_vector", "lora_magnitude")):
      if key.endswith(suffix):
        path = names.from_hf(key[len(_PEFT_PREFIX):-len(suffix)])
        break
    else:
      raise ValueError(f"{weights_path}: unexpected key {key!r}")
    if path not in modules:
      raise ValueError(f"{weights_path}: key {key!r} names module {path!r}, which target_modules did not select")
    expected[(path, attr)] = key
  for path, m in modules.items():
    attrs = ("lora_a", "lora_b") + (("lora_magnitude",) if m.use_dora else ())
    for attr in attrs:
      if (path, attr) not in expected:
        raise ValueError(f"{weights_path}: missing {attr} for module {path!r} ({names.to_hf(path)})")
      value = tensors[expected[(path, attr)]]
      if attr != "lora_magnitude":
        value = value.T
      var = getattr(m, attr)
      if value.shape != var.shape:
        raise ValueError(f"{weights_path}: {expected[(path, attr)]} has shape {value.shape}, expected {var.shape}")
      var[...] = value.astype(adapter_dtype)
  return sorted(modules)
