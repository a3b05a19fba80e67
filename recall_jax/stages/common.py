"""What several stages share: the model and tokenizer from the config, the encode settings, the dataset splits."""

from __future__ import annotations

import jax.numpy as jnp
from ml_collections import ConfigDict

from recall_jax.data import pipeline, readers
from recall_jax.data.image import ImageBuckets
from recall_jax.data.records import CIRSplit
from recall_jax.models import qwen2_5_vl
from recall_jax.stages import prepare

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_base_model(cfg: ConfigDict, workdir: str, checkpoint: str | None = None, *, mesh=None):
  """(model, tokenizer) from the base checkpoint (the configured one, or the tiny one of the prepare stage), or
  from `checkpoint` when given. With a mesh, every tensor is read once and placed straight onto its sharding
  (config sharding.rules; replicated by default)."""
  from transformers import AutoTokenizer
  if cfg.model.dtype not in DTYPES:
    raise ValueError(f"config model.dtype must be one of {sorted(DTYPES)}, got {cfg.model.dtype!r}")
  path = checkpoint or prepare.checkpoint_dir(cfg, workdir)
  from recall_jax import parallel
  model = qwen2_5_vl.from_pretrained(path, dtype=DTYPES[cfg.model.dtype], mesh=mesh,
                                     shardings=(parallel.rules_from_config(cfg) or None) if mesh is not None else None,
                                     position_mode=cfg.model.position_mode)
  return model, AutoTokenizer.from_pretrained(path)


def training_mesh(cfg: ConfigDict):
  from recall_jax import parallel
  return parallel.make_mesh(tuple(cfg.mesh.shape))


def foundation_checkpoint(cfg: ConfigDict, workdir: str) -> str:
  """The generative foundation model of Stage 3: the teach stage's fine-tuned checkpoint when that stage has
  finished, else the base checkpoint."""
  from recall_jax.stages import artifacts
  if artifacts.is_done(workdir, "teach"):
    return artifacts.read_manifest(workdir, "teach")["checkpoint"]
  return prepare.checkpoint_dir(cfg, workdir)


def latest_adapters(workdir: str) -> str | None:
  """The adapters of the most advanced finished training stage (refine, then adapt), or None."""
  from recall_jax.stages import artifacts
  for stage in ("refine", "adapt"):
    if artifacts.is_done(workdir, stage):
      return artifacts.read_manifest(workdir, stage)["adapter_dir"]
  return None


def load_retriever(cfg: ConfigDict, workdir: str):
  """(model, tokenizer, adapter_dir): the base model with the latest trained adapters merged in (base alone before
  Stage 1)."""
  from recall_jax.models import lora
  model, tokenizer = load_base_model(cfg, workdir)
  adapter_dir = latest_adapters(workdir)
  if adapter_dir:
    lora.import_peft(model, adapter_dir)
    lora.merge_lora(model)
  return model, tokenizer, adapter_dir


def encode_config(cfg: ConfigDict) -> pipeline.EncodeConfig:
  d = cfg.data
  return pipeline.EncodeConfig(
      image_buckets=ImageBuckets.from_config(d.image_buckets), query_lengths=tuple(d.query_lengths),
      target_lengths=tuple(d.target_lengths), caption_join=d.caption_join)


def read_splits(cfg: ConfigDict, workdir: str, split: str) -> list[CIRSplit]:
  """The configured dataset's splits (FashionIQ: one per category), from the real layout under data.root or the
  synthetic world's copy of that layout."""
  d = cfg.data
  world = prepare.world_root(cfg, workdir)  # validates data.root
  root = d.root or f"{world}/{d.dataset}"
  if d.dataset == "fashioniq":
    return readers.read_fashioniq(root, split, categories=tuple(d.categories), image_ext=d.image_ext,
                                  on_error=d.on_error)
  if d.dataset == "cirr":
    return [readers.read_cirr(root, split, on_error=d.on_error)]
  if d.dataset == "circo":
    return [readers.read_circo(root, split, on_error=d.on_error)]
  raise ValueError(f"config data.dataset must be fashioniq, cirr or circo, got {d.dataset!r}")
