"""recall_config.json: the preprocessing a set of adapters was trained with, written beside them by the training
stages (adapt, refine) and read by `Embedder.from_pretrained`, so embedding with the adapters later reproduces the
run: image buckets, text length buckets, padding, caption joining, prompts, base dtype, position mode, dataset,
evaluation protocol and the base checkpoint the adapters go on.

The prompts are recorded as the templates the run used; this code renders prompts from its own constants
(`data.prompts`), so a file whose templates differ is refused rather than embedded with other prompts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, get_args

from recall_jax import files
from recall_jax.data import pipeline, prompts
from recall_jax.data.image import ImageBuckets
from recall_jax.models.dtypes import DTYPES
from recall_jax.models.qwen2_5_vl.config import PositionMode

FILENAME = "recall_config.json"
FORMAT = 1


def prompt_templates(dataset: str) -> dict[str, str]:
  """The prompt templates this code embeds with for `dataset` (what a run records and a reader checks)."""
  if dataset not in prompts.QUERY_INSTRUCTIONS:
    raise ValueError(f"no query instruction for dataset {dataset!r}; known: {sorted(prompts.QUERY_INSTRUCTIONS)}")
  return {"system": prompts.RETRIEVAL_SYSTEM_PROMPT, "query_instruction": prompts.QUERY_INSTRUCTIONS[dataset],
          "target_instruction": prompts.TARGET_INSTRUCTION}


def encode_to_dict(enc: pipeline.EncodeConfig) -> dict[str, Any]:
  """The evaluation-time fields of an EncodeConfig (flip_captions is a training augmentation, not recorded)."""
  b = enc.image_buckets
  return {"image_buckets": [list(s) for s in b.sizes], "bucket_factor": b.factor,
          "query_lengths": list(enc.query_lengths), "target_lengths": list(enc.target_lengths),
          "padding_side": enc.padding_side, "caption_join": enc.caption_join, "min_pixels": enc.min_pixels,
          "max_pixels": enc.max_pixels, "patch_size": enc.patch_size, "merge_size": enc.merge_size,
          "image_mean": list(enc.image_mean), "image_std": list(enc.image_std)}


@dataclasses.dataclass(frozen=True)
class RecallConfig:
  base_checkpoint: str
  dtype: str
  position_mode: str
  dataset: str
  encode: pipeline.EncodeConfig
  prompts: dict
  protocol: dict
  categories: tuple[str, ...]
  image_ext: str
  eval_batch_size: int
  stage: str

  def to_dict(self) -> dict[str, Any]:
    return {"format": FORMAT, "stage": self.stage, "base_checkpoint": self.base_checkpoint, "dtype": self.dtype,
            "position_mode": self.position_mode, "dataset": self.dataset, "categories": list(self.categories),
            "image_ext": self.image_ext, "encode": encode_to_dict(self.encode), "prompts": dict(self.prompts),
            "protocol": dict(self.protocol), "eval_batch_size": self.eval_batch_size}


def write(adapter_dir: str, rc: RecallConfig) -> str:
  """<adapter_dir>/recall_config.json (the training stages build `rc` with `stages.common.adapter_recall_config`)."""
  return files.atomic_write_json(os.path.join(adapter_dir, FILENAME), rc.to_dict(), indent=1, sort_keys=True)


class _Reader:
  """Typed access to the file's keys; every error names the file and the key."""

  def __init__(self, path: str, data: Any):
    if not isinstance(data, dict):
      raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    self.path, self.data = path, data

  def get(self, key: str, kind: type, where: Optional[dict] = None, prefix: str = "") -> Any:
    where = self.data if where is None else where
    name = prefix + key
    if key not in where:
      raise ValueError(f"{self.path}: missing key {name!r}")
    value = where[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
      raise ValueError(f"{self.path}: key {name!r} must be a JSON {kind.__name__}, got {value!r}")
    return value

  def choice(self, key: str, allowed: tuple[str, ...]) -> str:
    value = self.get(key, str)
    if value not in allowed:
      raise ValueError(f"{self.path}: key {key!r} must be one of {allowed}, got {value!r}")
    return value

  def ints(self, key: str, where: dict, prefix: str) -> tuple[int, ...]:
    value = self.get(key, list, where, prefix)
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
      raise ValueError(f"{self.path}: key {prefix + key!r} must be a non-empty list of positive ints, got {value!r}")
    return tuple(value)


def _normalisation(r: _Reader, e: dict) -> dict[str, tuple[float, ...]]:
  """encode.image_mean / image_std. Files written before the second model family have neither: they were all
  Qwen2.5-VL runs, which normalise with CLIP's mean / std (pipeline.EncodeConfig's defaults)."""
  if "image_mean" not in e and "image_std" not in e:
    return {}
  out = {}
  for key in ("image_mean", "image_std"):
    value = r.get(key, list, e, "encode.")
    if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
      raise ValueError(f"{r.path}: key 'encode.{key}' must be 3 numbers (per channel), got {value!r}")
    out[key] = tuple(float(v) for v in value)
  return out


def read(adapter_dir: str) -> RecallConfig:
  """The adapters' recall_config.json; a missing file, a missing key or a bad value raises naming file and key."""
  path = os.path.join(adapter_dir, FILENAME)
  if not files.is_file(path):
    hint = ""
    if files.is_file(os.path.join(adapter_dir, "config.json")):
      hint = (f" ({adapter_dir} holds a config.json: is it a base checkpoint? Pass the adapter directory; the base "
              "is named inside its recall_config.json)")
    raise FileNotFoundError(f"{path} is missing: the adapt / refine stages write it beside the adapters with the "
                            f"preprocessing they were trained with{hint}. For adapters without one, load the model "
                            "yourself and build Embedder(model, tokenizer, encode=..., dataset=...)")
  try:
    r = _Reader(path, json.loads(files.read_text(path)))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from e
  if r.get("format", int) != FORMAT:
    raise ValueError(f"{path}: key 'format' is {r.data['format']}, this code reads format {FORMAT}")
  dataset = r.choice("dataset", tuple(prompts.QUERY_INSTRUCTIONS))
  recorded = r.get("prompts", dict)
  for key, text in prompt_templates(dataset).items():
    if r.get(key, str, recorded, "prompts.") != text:
      raise ValueError(f"{path}: key 'prompts.{key}' is {recorded[key]!r}, but this code embeds with {text!r}: "
                       "the adapters were trained with another prompt protocol")
  e = r.get("encode", dict)
  sizes = r.get("image_buckets", list, e, "encode.")
  try:
    buckets = ImageBuckets([tuple(s) for s in sizes], factor=r.get("bucket_factor", int, e, "encode."))
    encode = pipeline.EncodeConfig(
        image_buckets=buckets, query_lengths=r.ints("query_lengths", e, "encode."),
        target_lengths=r.ints("target_lengths", e, "encode."), padding_side=r.get("padding_side", str, e, "encode."),
        caption_join=r.get("caption_join", str, e, "encode."), min_pixels=r.get("min_pixels", int, e, "encode."),
        max_pixels=r.get("max_pixels", int, e, "encode."), patch_size=r.get("patch_size", int, e, "encode."),
        merge_size=r.get("merge_size", int, e, "encode."), **_normalisation(r, e))
  except (TypeError, ValueError) as err:
    if str(err).startswith(path):
      raise
    raise ValueError(f"{path}: key 'encode': {err}") from err
  categories = r.get("categories", list)
  if not all(isinstance(c, str) for c in categories):
    raise ValueError(f"{path}: key 'categories' must be a list of strings, got {categories!r}")
  return RecallConfig(
      base_checkpoint=r.get("base_checkpoint", str), dtype=r.choice("dtype", tuple(DTYPES)),
      position_mode=r.choice("position_mode", get_args(PositionMode)), dataset=dataset, encode=encode,
      prompts=dict(recorded), protocol=r.get("protocol", dict), categories=tuple(categories),
      image_ext=r.get("image_ext", str), eval_batch_size=r.get("eval_batch_size", int), stage=r.get("stage", str))
