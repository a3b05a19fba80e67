"""The whole config checked before any stage runs: types, ranges, enumerations and cross-field rules.

A value checked deep inside a stage can fail hours into a 7B run; here every problem is collected and reported at
once, each naming the key, the value and what is allowed. The enumerations are the owning modules' own constants.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ml_collections import ConfigDict


class ConfigError(ValueError):
  """One or more config values are not allowed; the message lists every problem."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    super().__init__("invalid config:\n  " + "\n  ".join(self.problems))


def _get(cfg: ConfigDict, key: str) -> Any:
  node: Any = cfg
  for part in key.split("."):
    if not isinstance(node, ConfigDict) or part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def _enums() -> dict[str, Sequence[Any]]:
  from recall_jax.generate import sft
  from recall_jax.data.readers import common as readers
  from recall_jax.generate import decide, parse
  from recall_jax.models import family, lora, remat
  from recall_jax.stages import calibrate, common, data_source, mine, prepare, refine
  return {
      "data.dataset": ("fashioniq", "cirr", "circo"),
      "data.format": data_source.FORMATS,
      "data.on_error": readers.ON_ERROR,
      "eval.split": ("train", "val", "test"),
      "model.dtype": tuple(sorted(common.DTYPES)),
      "model.family": tuple(sorted(family.FAMILIES)),
      "model.position_mode": ("mrope", "sequential"),
      "model.remat": tuple(remat.POLICIES),
      "model.tiny_tokenizer": prepare.TOKENIZERS,
      "lora.init": lora.INITS,
      "teach.lora.init": lora.INITS,
      "teach.reasoning": sft.REASONING,
      "mine.strategy": mine.STRATEGIES,
      "calibrate.prompt_mode": parse.MODES,
      "calibrate.rewriter": calibrate.REWRITERS,
      "calibrate.verify_reasoning": decide.REASONING,
      "calibrate.verify_turns": sft.VERIFY_TURNS,
      "refine.mode": refine.MODES,
  }


# key -> (lowest, highest, lowest allowed itself, highest allowed itself); ints where the default is an int.
_RANGES = {
    "rounds": (1, None, True, True),
    "train.steps": (1, None, True, True),
    "train.global_batch_size": (1, None, True, True),
    "train.chunk_size": (0, None, True, True),
    "train.log_every": (1, None, True, True),
    "train.checkpoint_every": (1, None, True, True),
    "train.eval_every": (1, None, True, True),
    "train.keep_checkpoints": (1, None, True, True),
    "eval.batch_size": (1, None, True, True),
    "mine.batch_size": (1, None, True, True),
    "mine.top_k": (1, None, True, True),
    "mine.max_per_query": (1, None, True, True),
    "mine.random_pool": (1, None, True, True),
    "teach.batch_size": (1, None, True, True),
    "teach.steps": (1, None, True, True),
    "teach.decision_weight": (0.0, None, False, True),
    "teach.vision.fresh_images": (0, None, True, True),
    "calibrate.batch_size": (1, None, True, True),
    "calibrate.max_new_tokens": (1, None, True, True),
    "calibrate.max_records": (0, None, True, True),
    "calibrate.vqa_threshold": (0.0, 1.0, True, True),
    "calibrate.temperature": (0.0, None, True, True),
    "calibrate.top_p": (0.0, 1.0, False, True),
    "calibrate.top_k": (0, None, True, True),
    "refine.steps": (1, None, True, True),
    "refine.triplet_weight": (0.0, None, True, True),
    "refine.infonce_weight": (0.0, None, True, True),
    "lora.rank": (1, None, True, True),
    "lora.alpha": (0.0, None, False, True),
    "lora.dropout": (0.0, 1.0, True, False),
    "teach.lora.rank": (1, None, True, True),
    "loss.temperature": (0.0, None, False, True),
    "loss.margin": (0.0, None, True, True),
    "optim.lr": (0.0, None, False, True),
    "optim.warmup_fraction": (0.0, 1.0, True, True),
    "optim.weight_decay": (0.0, None, True, True),
    "optim.clip_norm": (0.0, None, True, True),
    "teach.optim.lr": (0.0, None, False, True),
}


def _number_problem(key: str, value: Any, default_is_int: bool) -> str | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (default_is_int and not isinstance(value, int)):
    return f"config {key} = {value!r}: expected {'an int' if default_is_int else 'a number'}"
  if isinstance(value, float) and not math.isfinite(value):
    return f"config {key} = {value!r}: expected a finite number"
  return None


def problems(cfg: ConfigDict, stages: Sequence[str], mesh: Any = None) -> list[str]:
  """Every problem of `cfg` for a run of `stages` (plain names, rounds expanded or not) on `mesh` (when given, the
  batch sizes are checked against its batch shards and the process count); [] when it is fine."""
  out: list[str] = []
  for key, allowed in _enums().items():
    value = _get(cfg, key)
    if value is not _MISSING and value not in allowed:
      out.append(f"config {key} = {value!r}: must be one of {list(allowed)}")
  for key, (lo, hi, lo_in, hi_in) in _RANGES.items():
    value = _get(cfg, key)
    if value is _MISSING:
      continue
    bad_type = _number_problem(key, value, type(lo) is int)
    if bad_type:
      out.append(bad_type)
      continue
    low_bad = value < lo or (value == lo and not lo_in)
    high_bad = hi is not None and (value > hi or (value == hi and not hi_in))
    if low_bad or high_bad:
      interval = (("[" if lo_in else "(") + f"{lo}, " + (f"{hi}" + ("]" if hi_in else ")") if hi is not None
                                                         else "inf)"))
      out.append(f"config {key} = {value!r}: must be in {interval}")
  if out:  # the cross-field rules below assume sane values
    return out

  base = {s.split("/")[-1] for s in stages}
  t = cfg.train
  if t.chunk_size and t.global_batch_size % t.chunk_size:
    out.append(f"config train.global_batch_size = {t.global_batch_size} must be a multiple of train.chunk_size = "
               f"{t.chunk_size} (GradCache chunks)")
  if mesh is not None:
    out += _mesh_problems(cfg, base, mesh)
  for key in ("data.query_lengths", "data.target_lengths", "calibrate.prompt_lengths", "teach.lengths"):
    value = _get(cfg, key)
    if value is _MISSING:
      continue
    if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
      out.append(f"config {key} = {value!r}: must be a non-empty list of positive token lengths (buckets)")
  if not any("data." in p and "lengths" in p for p in out):
    out += _bucket_problems(cfg)
  if cfg.model.checkpoint is None:
    out.append("config model.checkpoint is required: a Hugging Face checkpoint directory of model.family, or \"\" for "
               "the tiny random checkpoint the prepare stage writes")
  if "teach" in base:
    tasks = _get(cfg, "teach.tasks")
    if tasks is not _MISSING and not tasks:
      out.append("config teach.tasks is empty: the teach stage needs at least one task")
  if "teach" in base and _get(cfg, "teach.vision.fresh_images") not in (_MISSING, 0) and cfg.data.root:
    out.append(f"config teach.vision.fresh_images = {cfg.teach.vision.fresh_images} renders the synthetic world, but "
               f"data.root = {cfg.data.root!r} is a real dataset: set it to 0")
  if "mine" in base and _get(cfg, "mine.strategy") == "random" and cfg.mine.random_pool < cfg.mine.max_per_query:
    out.append(f"config mine.random_pool = {cfg.mine.random_pool} must be >= mine.max_per_query = "
               f"{cfg.mine.max_per_query}")
  return out


# The global batches each stage splits over the mesh's batch shards and over the processes (each feeds its slice);
# decoding (calibrate) fills its batches itself.
_BATCH_KEYS = {"adapt": ("train.global_batch_size", "eval.batch_size"), "refine": ("train.global_batch_size", "eval.batch_size"),
               "teach": ("teach.batch_size",), "mine": ("mine.batch_size",), "evaluate": ("eval.batch_size",)}


def _mesh_problems(cfg: ConfigDict, stages: set[str], mesh: Any) -> list[str]:
  import jax
  from recall_jax import parallel
  shards, processes = parallel.batch_shards(mesh), jax.process_count()
  where = f"the {shards} batch shards of mesh {dict(mesh.shape)} (config mesh.shape = {tuple(cfg.mesh.shape)})"
  out = []
  for key in sorted({k for s in stages for k in _BATCH_KEYS.get(s, ())}):
    value = _get(cfg, key)
    if key == "train.global_batch_size" and cfg.train.chunk_size:
      key, value = "train.chunk_size", cfg.train.chunk_size  # each GradCache chunk is one sharded batch
    if value % shards:
      out.append(f"config {key} = {value} must be a multiple of {where}")
    elif value % processes:
      out.append(f"config {key} = {value} must be a multiple of the {processes} processes (each feeds its slice)")
  return out


def _bucket_problems(cfg: ConfigDict) -> list[str]:
  """The image buckets must be valid, and each query / target token bucket must hold the largest image's merged
  tokens (one image per query and per target) with room for the text around it."""
  from recall_jax.data.image import ImageBuckets
  from recall_jax.models import family
  if cfg.model.family not in family.FAMILIES:
    return []  # reported as an enum problem
  try:
    buckets = ImageBuckets.from_config(cfg.data.image_buckets, factor=family.get(cfg.model.family).image_factor)
  except ValueError as e:
    return [f"config data.image_buckets = {cfg.data.image_buckets!r}: {e}"]
  tokens = max((h // buckets.factor) * (w // buckets.factor) for h, w in buckets.sizes)
  out = []
  for key in ("data.query_lengths", "data.target_lengths"):
    value = tuple(_get(cfg, key))
    if min(value) <= tokens:
      out.append(f"config {key} = {value!r}: every bucket must exceed the {tokens} merged tokens of the largest "
                 f"image bucket (data.image_buckets = {cfg.data.image_buckets!r}) plus the prompt's text")
  return out


def validate(cfg: ConfigDict, stages: Sequence[str], mesh: Any = None) -> None:
  """Raises ConfigError listing every problem of `cfg` for a run of `stages` (on `mesh`, when given)."""
  found = problems(cfg, stages, mesh)
  if found:
    raise ConfigError(found)
