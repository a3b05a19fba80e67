"""PEFT adapter files <-> the LoRA/DoRA adapters of `recall_jax.models.lora`, for any model.

`export_peft` writes adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads;
`import_peft` adds the adapters of such a folder to a model. Both take the model's `PeftNames`, the map between
its NNX module paths and the module names of the PyTorch model peft wraps (e.g.
`recall_jax.models.qwen2_5_vl.names.PEFT_NAMES`), so nothing here knows a particular backbone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable

import jax.numpy as jnp
import safetensors.flax
from flax import nnx

from recall_jax import files
from recall_jax.models.lora import LoRALinear, apply_lora, lora_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class PeftNames:
  """Maps NNX module paths to the module names of the PyTorch model peft wraps, and back.

  to_hf raises ValueError for a module the torch model has no name for; from_hf raises ValueError for a name
  that is none of the model's.
  """
  to_hf: Callable[[str], str]
  from_hf: Callable[[str], str]


# For modules whose NNX paths already equal the torch module names.
IDENTITY_NAMES = PeftNames(lambda p: p, lambda n: n)


def _uniform(modules: dict[str, LoRALinear], attr: str):
  values = {getattr(m, attr) for m in modules.values()}
  if len(values) != 1:
    raise ValueError(f"export_peft: adapters differ in {attr} ({sorted(values)}); peft needs one value")
  return values.pop()


def export_peft(model: nnx.Module, out_dir: str, *, names: PeftNames, base_model_name_or_path: str | None) -> None:
  """Writes adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads.

  base_model_name_or_path: the checkpoint the adapters were trained on (peft's AutoPeftModel loads it); None
  only when the base exists nowhere on disk (a model built in memory).
  """
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
  files.atomic_write_json(os.path.join(out_dir, ADAPTER_CONFIG), config, indent=2)
  files.atomic_write_bytes(os.path.join(out_dir, ADAPTER_WEIGHTS),
                           safetensors.flax.save({k: jnp.asarray(v) for k, v in tensors.items()}))


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


def import_peft(model: nnx.Module, adapter_dir: str, *, names: PeftNames,
                adapter_dtype=jnp.float32, rngs: nnx.Rngs | None = None) -> list[str]:
  """Adds the adapters of a peft LoRA/DoRA checkpoint to `model` (which must have none) and loads their weights.

  Target modules are chosen the way peft chooses them, from `target_modules` over the Hugging Face names of the
  model's `nnx.Linear` modules. Returns the adapted module paths.
  """
  config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
  weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
  for p in (config_path, weights_path):
    if not files.is_file(p):
      raise FileNotFoundError(f"import_peft: missing {p}")
  config = json.loads(files.read_text(config_path))
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

  paths = [".".join(map(str, p)) for p, m in nnx.iter_modules(model) if p and type(m) is nnx.Linear]
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

  tensors = safetensors.flax.load(files.read_bytes(weights_path))
  # Key -> (module, attribute); file keys may name modules in another layout than to_hf, so resolve them through
  # from_hf.
  modules = lora_modules(model)
  expected = {}
  for key in tensors:
    if not key.startswith(_PEFT_PREFIX):
      raise ValueError(f"{weights_path}: unexpected key {key!r} (no {_PEFT_PREFIX!r} prefix)")
    for suffix, attr in ((".lora_A.weight", "lora_a"), (".lora_B.weight", "lora_b"),
                         (".lora_magnitude_vector.weight", "lora_magnitude"),
                         (".lora_magnitude_vector", "lora_magnitude")):
      if key.endswith(suffix):
        try:
          path = names.from_hf(key[len(_PEFT_PREFIX):-len(suffix)])
        except ValueError as e:
          raise ValueError(f"{weights_path}: key {key!r}: {e}") from e
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
