"""Stage 1, baseline adaptation: LoRA/DoRA on the foundation model (`common.foundation_checkpoint`), InfoNCE on the training triplets, best
checkpoint by validation retrieval; the adapters are exported in PEFT format to <workdir>/adapt/adapters."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
from ml_collections import ConfigDict

from recall_jax import parallel, recall_config
from recall_jax.data.records import CIRSplit, Query
from recall_jax.eval import embeddings, retrieval
from recall_jax.stages import common, data_source
from recall_jax.train import settings, trainer
from recall_jax.train.step import LossConfig

log = logging.getLogger("recall_jax")


def val_eval_fn(cfg: ConfigDict, workdir: str, tokenizer, splits: Sequence[CIRSplit], mesh=None):
  """model -> mean over the val splits of each metric (FashionIQ: over categories)."""
  encode_cfg = common.encode_config(cfg)
  loads = [data_source.image_loader(cfg, workdir, [split]) for split in splits]

  def eval_fn(model) -> dict[str, float]:
    per_split = []
    for split, load in zip(splits, loads):
      protocol = common.protocol(cfg, split.dataset)
      q, g = embeddings.embed_split(model, split, tokenizer=tokenizer, encode_cfg=encode_cfg,
                                    batch_size=cfg.eval.batch_size, load=load, mesh=mesh)
      per_split.append(retrieval.evaluate_split(split, q, g, protocol)["metrics"])
    return {k: float(np.mean([m[k] for m in per_split])) for k in per_split[0]}

  return eval_fn


def train_on(cfg: ConfigDict, workdir: str, out: str, queries: Sequence[Query], splits: Sequence[CIRSplit], *,
             grouped: bool, model=None, tokenizer=None, stop_after: Optional[int] = None, mesh=None,
             loop: Optional[settings.LoopConfig] = None, loss: Optional[LossConfig] = None) -> dict:
  """Shared by Stage 1 and Stage 4: train adapters on `queries` (their images: those of `splits`), evaluating on
  the val split, on `mesh` (default: the config's). `loop` and `loss` default to config train and loss."""
  mesh = mesh if mesh is not None else parallel.mesh_from_config(cfg)
  if model is None:
    model, tokenizer = common.load_base_model(cfg, workdir, mesh=mesh)
  else:
    common.place_model(model, cfg, mesh)  # the val evaluation embeds with the model itself
  val = common.read_splits(cfg, workdir, cfg.eval.split)
  result = trainer.train(
      cfg, model, tokenizer, queries, dataset=cfg.data.dataset, load=data_source.image_loader(cfg, workdir, splits),
      encode_cfg=common.encode_config(cfg), out_dir=out, eval_fn=val_eval_fn(cfg, workdir, tokenizer, val, mesh),
      grouped=grouped, stop_after=stop_after, mesh=mesh, loop=loop, loss=loss)
  return {"steps": result.steps, "adapter_dir": result.adapter_dir, "best_step": result.best_step,
          "best_val_metrics": result.best_metrics, "last_train_metrics": result.last_metrics,
          "train_queries": len(queries)}


def run(cfg: ConfigDict, workdir: str, out: str, *, mesh=None) -> dict:
  splits = common.read_splits(cfg, workdir, "train")
  queries = [q for s in splits for q in s.queries]
  log.info("[adapt] %d training triplets", len(queries))
  manifest = train_on(cfg, workdir, out, queries, splits, grouped=False, mesh=mesh)
  # The base these adapters belong to (R_base starts from F): checked whenever they are merged again.
  manifest["base_checkpoint"] = common.foundation_checkpoint(cfg, workdir)
  # Beside the adapters, the preprocessing they were trained with, for Embedder.from_pretrained.
  recall_config.write(manifest["adapter_dir"],
                      common.adapter_recall_config(cfg, "adapt", manifest["base_checkpoint"]))
  return manifest
