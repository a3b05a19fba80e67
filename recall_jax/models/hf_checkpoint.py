"""Hugging Face checkpoints <-> an NNX model of either family: streaming safetensors loader and a writer.

What a family brings is a `CheckpointFormat` (its config and model classes, its name map, its image processor's
settings); `recall_jax.models.qwen2_5_vl.params` and `recall_jax.models.qwen3_vl.params` bind theirs.

Loading reads config.json, then one tensor at a time from model.safetensors (or the shards listed in
model.safetensors.index.json), converts it to the NNX layout and places it straight onto its target device /
sharding, into a model created abstractly (nnx.eval_shape) so nothing is allocated twice.

Key names: every layout the family's name map reads (Qwen2.5-VL: hub names `model.layers.*`, `visual.*` and
transformers-5 in-memory names `model.language_model.*`, `model.visual.*`) map onto the module paths
(`language_model.*`, `visual.*`, `lm_head`); the writer uses the layout transformers saves. Per module type:
nnx.Linear `kernel` = torch weight.T (the Conv3d patch embedding is flattened first), nnx.Embed `embedding` =
weight, other params (norm `weight` / `bias`) as they are. Tied-embedding checkpoints have no lm_head.weight (a
redundant copy is skipped, as transformers does). The writer adds preprocessor_config.json, so transformers'
AutoImageProcessor preprocesses for a written checkpoint as `recall_jax.data.image` does (AutoProcessor also
builds the video processor, which needs torchvision: not a dependency here).

Parameter paths for sharding rules are the NNX paths joined by "/", e.g.
"language_model/layers/0/self_attn/q_proj/kernel".
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import DTypeLike

from recall_jax import parallel
from recall_jax.data import image
from recall_jax.files import local_output, local_view

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"

Path = tuple[str | int, ...]
Shardings = Callable[[str], PartitionSpec] | Sequence[tuple[str, Sequence[str | None]]]


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
  """What the loader and writer need to know of a model family."""
  family: str  # the name errors use, e.g. "Qwen2.5-VL"
  config_cls: type  # from_pretrained(dir), to_hf_dict(), replace(**overrides)
  model_cls: type  # model_cls(cfg, dtype=, param_dtype=, rngs=)
  names: Any  # its name map: nnx_path(hf_name) -> path | None, hf_name(path, layout), SAVE_LAYOUT
  processor_class: str  # preprocessor_config.json's processor_class
  image_mean: tuple[float, ...]
  image_std: tuple[float, ...]


# ---------------------------------------------------------------------------------------------------------------
# safetensors files, read one tensor at a time


_LFS_POINTER = b"version https://git-lfs"


class SafetensorsFile:
  """One .safetensors file through the `safetensors` library (numpy, bf16 via ml_dtypes), which validates the header
  against the file (offsets, shapes, size) when it opens it; `read(key)` returns that tensor alone."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        head = f.read(len(_LFS_POINTER))
    except OSError as e:
      raise ValueError(f"{path}: cannot read ({e})") from e
    if head == _LFS_POINTER:
      raise ValueError(f"{path}: a git-lfs pointer, not the weights (fetch them with `git lfs pull`)")
    try:
      self._file = safetensors.safe_open(path, framework="np")
      self.entries = list(self._file.keys())
    except Exception as e:  # SafetensorError and OSError: a truncated file, a header at odds with its shapes, ...
      raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e

  def keys(self) -> list[str]:
    return list(self.entries)

  def read(self, key: str) -> np.ndarray:
    try:
      return self._file.get_tensor(key)
    except Exception as e:
      raise ValueError(f"{self.path}: tensor {key!r} cannot be read ({type(e).__name__}: {e})") from e


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes a .safetensors file (metadata format "pt", so transformers accepts it)."""
  try:
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
                                metadata={"format": "pt"})
  except Exception as e:  # e.g. a dtype safetensors has no name for
    raise ValueError(f"{path}: cannot write the tensors ({type(e).__name__}: {e})") from e


def checkpoint_files(checkpoint_dir: str) -> dict[str, str]:
  """{key: safetensors path} from model.safetensors.index.json, or from the single model.safetensors."""
  index_path = os.path.join(checkpoint_dir, SAFETENSORS_INDEX)
  single_path = os.path.join(checkpoint_dir, SAFETENSORS_FILE)
  if os.path.exists(index_path):
    try:
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError) as e:
      raise ValueError(f"{index_path}: malformed safetensors index ({e!r})") from e
    files = {k: os.path.join(checkpoint_dir, v) for k, v in weight_map.items()}
    for path in sorted(set(files.values())):
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: listed in {index_path} but missing")
    return files
  if os.path.exists(single_path):
    return {k: single_path for k in SafetensorsFile(single_path).keys()}
  raise FileNotFoundError(f"{checkpoint_dir}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def _tensors(files: dict[str, str]) -> Iterator[tuple[str, str, np.ndarray]]:
  """(key, file, array) for every key, one file at a time (each file opened once)."""
  by_file: dict[str, set[str]] = {}
  for key, path in files.items():
    by_file.setdefault(path, set()).add(key)
  for path in sorted(by_file):
    st = SafetensorsFile(path)
    absent = sorted(by_file[path] - set(st.entries))
    if absent:
      raise KeyError(f"{path}: key {absent[0]!r} listed in the index is not in the file")
    for key in st.keys():
      if key in by_file[path]:
        yield key, path, st.read(key)


# ---------------------------------------------------------------------------------------------------------------
# name and layout maps


def _module_at(model: nnx.Module, path: Path) -> Any:
  obj = model
  for part in path:
    if isinstance(part, int):
      if not isinstance(obj, nnx.List) or not 0 <= part < len(obj):
        return None
      obj = obj[part]
    else:
      obj = getattr(obj, part, None)
    if obj is None:
      return None
  return obj


def _split_path(dotted: str) -> Path:
  return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def _conv_shapes(cfg: Any) -> dict[Path, tuple[int, ...]]:
  """Linear layers stored as convolutions in HF checkpoints: module path -> torch weight shape."""
  v = cfg.vision
  return {("visual", "patch_embed", "proj"): (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size,
                                              v.patch_size)}


def hf_key_to_param_path(key: str, model: nnx.Module, names: Any) -> tuple[Path, bool] | None:
  """(NNX param path, transpose?) for an HF key (read through the name map `names`), or None when the model has no
  such parameter."""
  dotted = names.nnx_path(key)
  if dotted is None:
    return None
  parts = _split_path(dotted)
  module_path, name = parts[:-1], parts[-1]
  module = _module_at(model, module_path)
  if isinstance(module, nnx.Linear):
    attr, transpose = {"weight": ("kernel", True), "bias": ("bias", False)}.get(name, (None, False))
  elif isinstance(module, nnx.Embed):
    attr, transpose = ("embedding", False) if name == "weight" else (None, False)
  else:
    attr, transpose = name, False
  if attr is None or module is None or not isinstance(getattr(module, attr, None), nnx.Param):
    return None
  return module_path + (attr,), transpose


def param_path_to_hf_key(path: Path, names: Any) -> str:
  """The key transformers' save_pretrained writes for an NNX param path (layout `names.SAVE_LAYOUT`)."""
  *module, attr = (str(p) for p in path)
  name = {"kernel": "weight", "embedding": "weight"}.get(attr, attr)
  return names.hf_name(".".join([*module, name]), names.SAVE_LAYOUT)


def _to_nnx_layout(arr: np.ndarray, transpose: bool, key: str, file: str, target_shape: tuple[int, ...],
                   conv_shape: tuple[int, ...] | None) -> np.ndarray:
  """Checks the HF shape, then flattens (convolutions) and transposes Linear weights to the (in, out) kernel."""
  expected_hf = conv_shape or (tuple(reversed(target_shape)) if transpose else target_shape)
  if tuple(arr.shape) != tuple(expected_hf):
    raise ValueError(f"{file}: key {key!r} has shape {tuple(arr.shape)}, model expects {tuple(expected_hf)}")
  if transpose:
    arr = arr.reshape(arr.shape[0], -1).T
  return arr


# ---------------------------------------------------------------------------------------------------------------
# loading


def _sharding_for(path: str, shape: tuple[int, ...], mesh: Mesh | None,
                  shardings: Shardings | None) -> jax.sharding.Sharding:
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if shardings is None:
    return NamedSharding(mesh, PartitionSpec())
  if callable(shardings):
    return NamedSharding(mesh, shardings(path))
  return parallel.param_shardings({path: shape}, mesh, shardings)[path]


def _place(arr: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """Only the slices this process's devices hold are copied, so multi-host loading works the same way."""
  return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])


def from_pretrained(fmt: CheckpointFormat, checkpoint_dir: str, dtype: DTypeLike = jnp.float32,
                    mesh: Mesh | None = None, shardings: Shardings | None = None, **config_overrides: Any):
  """Loads an HF checkpoint directory of the family `fmt` into its model with params (and compute) in `dtype`.

  mesh: place every parameter on this mesh; shardings: a callable param-path -> PartitionSpec, or regex rules
  [(pattern, spec), ...] (first re.search match wins, see recall_jax.parallel), default replicated.
  config_overrides: config fields to replace, e.g. position_mode="sequential".
  The model's `name_or_path` is `checkpoint_dir` (as transformers' PreTrainedModel.name_or_path): the base that
  PEFT exports of adapters trained on it name.
  """
  if shardings is not None and mesh is None:
    raise ValueError("from_pretrained: shardings given without a mesh")
  with local_view(checkpoint_dir) as local:  # a bucket checkpoint is read from a local copy (safetensors maps files)
    model = _load(fmt, local, dtype, mesh, shardings, config_overrides)
  model.name_or_path = checkpoint_dir
  return model


def _load(fmt: CheckpointFormat, checkpoint_dir: str, dtype: DTypeLike, mesh: Mesh | None,
          shardings: Shardings | None, config_overrides: dict[str, Any]):
  cfg = fmt.config_cls.from_pretrained(checkpoint_dir).replace(**config_overrides)
  files = checkpoint_files(checkpoint_dir)
  abstract = nnx.eval_shape(lambda: fmt.model_cls(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise TypeError(f"{fmt.model_cls.__name__} holds non-parameter state {list(nnx.to_flat_state(rest))[:3]}; the loader "
                    "only fills nnx.Param")
  targets = dict(nnx.to_flat_state(params))
  conv_shapes = _conv_shapes(cfg)
  loaded: dict[Path, jax.Array] = {}
  for key, path, arr in _tensors(files):
    if cfg.tie_word_embeddings and key == "lm_head.weight":
      continue  # a tied checkpoint's redundant copy of embed_tokens
    mapped = hf_key_to_param_path(key, abstract, fmt.names)
    if mapped is None:
      raise KeyError(f"{path}: unexpected key {key!r} (no such parameter in {fmt.model_cls.__name__} for this "
                     "config)")
    param_path, transpose = mapped
    if param_path in loaded:
      raise KeyError(f"{path}: key {key!r} maps to {'/'.join(map(str, param_path))}, already loaded from another key")
    target = targets[param_path].get_value()  # a ShapeDtypeStruct
    arr = _to_nnx_layout(arr, transpose, key, path, target.shape,
                         conv_shapes.get(param_path[:-1]) if param_path[-1] == "kernel" else None)
    name = "/".join(map(str, param_path))
    loaded[param_path] = _place(arr.astype(target.dtype), _sharding_for(name, arr.shape, mesh, shardings))
  missing = [param_path_to_hf_key(p, fmt.names) for p in targets if p not in loaded]
  if missing:
    raise KeyError(f"{checkpoint_dir}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                   f"({len(missing)} in all)")
  for param_path, variable in targets.items():
    variable.set_value(loaded[param_path])
  return nnx.merge(graphdef, nnx.from_flat_state(targets))


# ---------------------------------------------------------------------------------------------------------------
# saving


def preprocessor_config(fmt: CheckpointFormat, cfg: Any, *, min_pixels: int = image.MIN_PIXELS,
                        max_pixels: int = image.MAX_PIXELS) -> dict[str, Any]:
  """preprocessor_config.json for transformers' Qwen2-VL image processor (both backends), describing the
  preprocessing of `recall_jax.data.image.preprocess_images` with these pixel bounds for a model of config `cfg`.

  transformers 5 reads the pixel bounds from `size` (shortest_edge / longest_edge: areas, not edges); the
  top-level min_pixels / max_pixels (which override `size` when present) say the same for readers of those keys.
  """
  v = cfg.vision
  return {
      "image_processor_type": "Qwen2VLImageProcessor",
      "processor_class": fmt.processor_class,
      "do_convert_rgb": True,
      "do_resize": True,
      "resample": int(image.RESAMPLE),
      "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
      "min_pixels": min_pixels,
      "max_pixels": max_pixels,
      "do_rescale": True,
      "rescale_factor": 1 / 255,
      "do_normalize": True,
      "image_mean": list(fmt.image_mean),
      "image_std": list(fmt.image_std),
      "patch_size": v.patch_size,
      "temporal_patch_size": v.temporal_patch_size,
      "merge_size": v.spatial_merge_size,
  }


def save_pretrained(fmt: CheckpointFormat, model: nnx.Module, checkpoint_dir: str, *,
                    min_pixels: int = image.MIN_PIXELS, max_pixels: int = image.MAX_PIXELS) -> None:
  """Writes config.json (nested transformers-5 layout), model.safetensors with hub key names, in the params'
  dtype, and preprocessor_config.json (`preprocessor_config`, with these pixel bounds); transformers'
  from_pretrained of the family's model class and AutoImageProcessor.from_pretrained read the result.
  A bucket path (gs://...) is written locally first, then uploaded file by file."""
  with local_output(checkpoint_dir) as local:
    _save(fmt, model, local, min_pixels, max_pixels)


def _save(fmt: CheckpointFormat, model: nnx.Module, checkpoint_dir: str, min_pixels: int, max_pixels: int) -> None:
  conv_shapes = _conv_shapes(model.cfg)
  tensors = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    arr = np.asarray(jax.device_get(variable.get_value()))
    if path[-1] == "kernel":
      arr = arr.T
      conv = conv_shapes.get(tuple(path[:-1]))
      if conv is not None:
        arr = arr.reshape(conv)
    tensors[param_path_to_hf_key(path, fmt.names)] = arr
  config = model.cfg.to_hf_dict()
  config["dtype"] = str(next(iter(tensors.values())).dtype)
  with open(os.path.join(checkpoint_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(checkpoint_dir, PREPROCESSOR_CONFIG), "w") as f:
    json.dump(preprocessor_config(fmt, model.cfg, min_pixels=min_pixels, max_pixels=max_pixels), f, indent=2)
  write_safetensors(os.path.join(checkpoint_dir, SAFETENSORS_FILE), dict(sorted(tensors.items())))
