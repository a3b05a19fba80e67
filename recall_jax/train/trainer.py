"""The contrastive trainer (Stage 1 adaptation and Stage 4 refinement): one loop, read top to bottom.

  adapters -> optimizer -> data iterator -> resume -> [step, log, checkpoint, evaluate]* -> export adapters

Only adapter parameters are trained (frozen base: no gradients, no optimizer state). Checkpoints hold {adapters,
optimizer state, step, rng} plus the Grain iterator position; a restarted run resumes from the latest one. The only
host syncs in the loop are at logging, checkpoint and evaluation intervals.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from recall_jax import parallel
from recall_jax.data import pipeline
from recall_jax.data.records import Query
from recall_jax.models import lora
from recall_jax.train import step as step_lib
from recall_jax.train.checkpoint import Checkpoints
from recall_jax.train.logging import MetricWriter, Progress
from recall_jax.train.optim import make_optimizer

log = logging.getLogger("recall_jax")

EvalFn = Callable[[Any], dict[str, float]]


@dataclasses.dataclass
class TrainResult:
  steps: int
  adapter_dir: str
  best_step: Optional[int]
  best_metrics: Optional[dict]
  last_metrics: dict


def add_adapters(model, cfg: ConfigDict, seed: int) -> list[str]:
  c = cfg.lora
  return lora.apply_lora(model, c.target_regex or lora.DEFAULT_TARGET_REGEX, rank=c.rank, alpha=c.alpha,
                         dropout=c.dropout, use_dora=c.use_dora, init=c.init,
                         rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def loss_config(cfg: ConfigDict) -> step_lib.LossConfig:
  c = cfg.loss
  return step_lib.LossConfig(temperature=c.temperature, infonce_weight=c.infonce_weight,
                             triplet_weight=c.triplet_weight, margin=c.margin, symmetric=c.symmetric,
                             mask_duplicate_targets=c.mask_duplicate_targets)


def _replicate(tree, mesh: Optional[Mesh]):
  return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, P()))


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
                      tree)


def train(cfg: ConfigDict, model, tokenizer, queries: Sequence[Query], *, dataset: str, load: pipeline.ImageLoader,
          encode_cfg: pipeline.EncodeConfig, out_dir: str, eval_fn: Optional[EvalFn] = None,
          mesh: Optional[Mesh] = None, grouped: bool = False, stop_after: Optional[int] = None) -> TrainResult:
  """Trains adapters on `queries` (training triplets); `model` gets adapters attached (or keeps the ones it has).

  cfg: the run config (sections train, lora, loss, optim). eval_fn(model) -> {metric: value} runs every
  cfg.train.eval_every steps; the best checkpoint by cfg.train.best_metric is kept. `stop_after` ends the loop early
  after that many steps of this call (a test hook standing in for a killed process).
  """
  t = cfg.train
  mesh = mesh or parallel.make_mesh(tuple(cfg.mesh.shape))
  if not lora.lora_modules(model):
    names = add_adapters(model, cfg, cfg.seed)
    log.info("[train] adapters on %d modules (rank %d, alpha %g, dora=%s)", len(names), cfg.lora.rank,
             cfg.lora.alpha, cfg.lora.use_dora)
  model.train()
  graphdef, adapters, rng_state, base = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
  frozen = _replicate((rng_state, base), mesh)
  tx = make_optimizer(lr=cfg.optim.lr, total_steps=t.steps, warmup_fraction=cfg.optim.warmup_fraction,
                      weight_decay=cfg.optim.weight_decay, b1=cfg.optim.b1, b2=cfg.optim.b2,
                      clip_norm=cfg.optim.clip_norm)
  pure = _replicate(nnx.to_pure_dict(adapters), mesh)
  state = {"adapters": pure, "opt_state": tx.init(pure), "step": _replicate(np.int32(0), mesh),
           "rng": _replicate(jax.random.key_data(jax.random.key(cfg.seed)), mesh)}

  num_chunks = max(1, t.global_batch_size // t.chunk_size) if t.chunk_size else 1
  if t.global_batch_size % num_chunks:
    raise ValueError(f"config train.global_batch_size {t.global_batch_size} is not a multiple of train.chunk_size "
                     f"{t.chunk_size}")
  ds = pipeline.train_dataset(queries, dataset=dataset, load=load, tokenizer=tokenizer, cfg=encode_cfg,
                              global_batch_size=t.global_batch_size, seed=cfg.seed, grouped=grouped)
  iterator = pipeline.make_iterator(ds, num_threads=t.data_threads, prefetch=2, num_workers=t.data_workers)

  ckpt = Checkpoints(os.path.join(out_dir, "checkpoints"), keep=t.keep_checkpoints,
                     best_metric=t.best_metric if eval_fn else None)
  start = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(_abstract(state), data_iterator=iterator)
    start = int(meta["step"])
    log.info("[train] resumed from step %d (%s)", start, ckpt.latest_step())

  train_step = step_lib.make_train_step(graphdef, tx, loss_config(cfg), num_chunks=num_chunks)
  writer = MetricWriter(out_dir, is_primary=jax.process_index() == 0)
  progress = Progress(t.steps)
  progress.start(start)
  pending: list[dict] = []
  last_metrics: dict = {}
  local_batch = t.global_batch_size // jax.process_count()
  done_here = 0
  for step in range(start, t.steps):
    batch = next(iterator)
    arrays, geometry = step_lib.host_batch(model.cfg, batch, images_per_call=local_batch // num_chunks,
                                           step_seed=cfg.seed * 7919 + step)
    arrays = jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        parallel.batch_sharding(mesh, x.ndim), x), arrays)
    state, metrics = train_step(state, frozen, arrays, geometry)
    pending.append(metrics)
    done_here += 1
    at_end = step + 1 == t.steps
    if (step + 1) % t.log_every == 0 or at_end:
      # The one host sync per logging interval: average the interval's metrics.
      means = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
      pending.clear()
      last_metrics = means
      writer.write(step + 1, means, prefix="train/", progress=progress.line(step + 1))
    if (step + 1) % t.checkpoint_every == 0 or at_end:
      ckpt.save(step + 1, state, data_iterator=iterator)
    if eval_fn is not None and ((step + 1) % t.eval_every == 0 or at_end):
      scores = _evaluate(model, eval_fn, state["adapters"])
      writer.write(step + 1, scores, prefix="val/")
      if ckpt.save_best(step + 1, state, scores):
        log.info("[train] new best %s=%.3f at step %d", t.best_metric, scores[t.best_metric], step + 1)
    if stop_after and done_here >= stop_after and not at_end:
      break
  writer.close()

  best_step = ckpt.best_step()
  best_metrics = None
  final = state["adapters"]
  if best_step is not None:
    best_state, meta = ckpt.restore(_abstract(state), best=True)
    final, best_metrics = best_state["adapters"], meta.get("metrics")
  nnx.update(model, final)
  ckpt.close()
  steps = int(jax.device_get(state["step"]))
  adapter_dir = os.path.join(out_dir, "adapters")
  if steps == t.steps and jax.process_index() == 0:
    lora.export_peft(model, adapter_dir)
  model.eval()
  return TrainResult(steps=steps, adapter_dir=adapter_dir, best_step=best_step, best_metrics=best_metrics,
                     last_metrics=last_metrics)


def _evaluate(model, eval_fn: EvalFn, adapters) -> dict[str, float]:
  nnx.update(model, adapters)
  model.eval()
  try:
    return {k: float(v) for k, v in eval_fn(model).items()}
  finally:
    model.train()
