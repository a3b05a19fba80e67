"""The trainer: one loop, read top to bottom, shared by two objectives.

  trained params -> optimizer -> data iterator -> resume -> [step, log, checkpoint, evaluate]* -> final params

`train` is the contrastive objective (Stage 1 adaptation and Stage 4 refinement: LoRA/DoRA adapters, InfoNCE (+
triplet), PEFT export); `recall_jax.stages.teach` builds the generative one (recall_jax.train.generative) and calls
`fit` with it. An `Objective` names the trained parameters (an nnx filter: the adapters, or a regex over parameter
paths); everything else is frozen (no gradients, no optimizer state). Checkpoints hold {trained params (under
the key "adapters"), optimizer state, step, rng} plus the Grain iterator position; a restarted run resumes from
the latest one. On SIGTERM the loop finishes the step, saves it and exits (`preemption.Preempted`). The only host
syncs in the loop are at logging, checkpoint and evaluation intervals.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Optional, Sequence

import grain
import jax
import numpy as np
import optax
from clu import metrics as clu_metrics
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from recall_jax import faults, flops, hardware, parallel
from recall_jax.data import pipeline
from recall_jax.data.records import Query
from recall_jax.models import family, lora, peft_io
from recall_jax.train import settings
from recall_jax.train import step as step_lib
from recall_jax.train.checkpoint import Checkpoints
from recall_jax.train.compiles import CompileCounter
from recall_jax.progress import Progress
from recall_jax.train.logging import MetricWriter
from recall_jax.train.preemption import Preempted, Preemption
from recall_jax.train.settings import LoopConfig, OptimConfig

log = logging.getLogger("recall_jax")

EvalFn = Callable[[Any], dict[str, float]]


def add_adapters(model, cfg: ConfigDict, seed: int) -> list[str]:
  c = cfg.lora
  return lora.apply_lora(model, c.target_regex or family.of_model(model).lora_target_regex, rank=c.rank,
                         alpha=c.alpha, dropout=c.dropout, use_dora=c.use_dora, init=c.init,
                         rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def gradcache_chunks(train_cfg: ConfigDict) -> int:
  """GradCache chunks of a step: global batch / train.chunk_size (1 without chunking)."""
  t = train_cfg
  num_chunks = max(1, t.global_batch_size // t.chunk_size) if t.chunk_size else 1
  if t.global_batch_size % num_chunks:
    raise ValueError(f"config train.global_batch_size {t.global_batch_size} is not a multiple of train.chunk_size "
                     f"{t.chunk_size}")
  return num_chunks


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
                      tree)


def initial_state(trained: dict, tx: optax.GradientTransformation, seed: int) -> dict:
  """The step's state before step 0: {"adapters": the trained params (pure dict), "opt_state", "step", "rng"}."""
  return {"adapters": trained, "opt_state": tx.init(trained), "step": np.int32(0),
          "rng": jax.random.key_data(jax.random.key(seed))}


@dataclasses.dataclass(frozen=True)
class Objective:
  """What one training objective gives the shared loop.

  trainable:  nnx filter of the trained parameters (the rest is frozen: no gradients, no optimizer state).
  dataset:    this process's batches, element i = batch i of the run (a pure function of the seed).
  host_batch: pipeline batch -> (per-example arrays, static vision geometry) on the host; no randomness there.
  make_step:  (graphdef, optax tx) -> jitted step(state, frozen, arrays, geometry) -> (state, metrics), where
              state = {"adapters": trained params (pure dict), "opt_state", "step", "rng"}, frozen = (rng, rest);
              its randomness comes from state["rng"] folded with state["step"] (`step.step_key`).
  """

  trainable: Any
  dataset: grain.MapDataset
  host_batch: Callable[[dict], tuple[dict, Any]]
  make_step: Callable[[nnx.GraphDef, optax.GradientTransformation], Callable]
  flops: Optional[Callable[[dict], int]] = None  # pipeline batch -> analytic model FLOPs of the global step


@dataclasses.dataclass(frozen=True)
class FitResult:
  steps: int
  best_step: Optional[int]
  best_metrics: Optional[dict]
  last_metrics: dict
  compilations: int  # programs the step calls of this fit lowered (train/compiles.py): 1 with static shapes
  adapter_dir: Optional[str] = None  # `train`: where the PEFT export went (written once all steps are done)


def train(cfg: ConfigDict, model, tokenizer, queries: Sequence[Query], *, dataset: str, load: pipeline.ImageLoader,
          encode_cfg: pipeline.EncodeConfig, out_dir: str, eval_fn: Optional[EvalFn] = None,
          mesh: Optional[Mesh] = None, grouped: bool = False, stop_after: Optional[int] = None,
          loop: Optional[LoopConfig] = None, loss: Optional[step_lib.LossConfig] = None) -> FitResult:
  """The contrastive objective: trains adapters on `queries` (training triplets); `model` gets adapters attached
  (or keeps the ones it has), exported in PEFT format to <out_dir>/adapters at the end.

  cfg: the run config (sections train, lora, loss, optim, seed, mesh, sharding). `loop` and `loss` default to
  config train and loss (refine passes its own). eval_fn(model) -> {metric: value} runs every loop.eval_every steps;
  the best checkpoint by loop.best_metric is kept. `stop_after` ends the loop early after that many steps of this
  call (a test hook standing in for a killed process).
  """
  t = cfg.train
  loop = loop or settings.train_loop(t)
  loss = loss or settings.loss(cfg.loss)
  if not lora.lora_modules(model):
    names = add_adapters(model, cfg, cfg.seed)
    log.info("[train] adapters on %d modules (rank %d, alpha %g, dora=%s)", len(names), cfg.lora.rank,
             cfg.lora.alpha, cfg.lora.use_dora)
  num_chunks = gradcache_chunks(t)
  ds = pipeline.train_dataset(queries, dataset=dataset, load=load, tokenizer=tokenizer, cfg=encode_cfg,
                              global_batch_size=t.global_batch_size, seed=cfg.seed, grouped=grouped)

  def host_batch(batch):
    # The vision geometry is global (replicated): one model call embeds a chunk of the global batch.
    return step_lib.host_batch(model.cfg, batch, images_per_call=t.global_batch_size // num_chunks)

  adapters = flops.Adapters(regex=cfg.lora.target_regex or family.of_model(model).lora_target_regex,
                            rank=cfg.lora.rank, dora=cfg.lora.use_dora, dropout=cfg.lora.dropout > 0)

  def step_flops(batch):
    return flops.train_step(model.cfg, batch=t.global_batch_size, num_chunks=num_chunks,
                            query_length=batch["query_input_ids"].shape[1],
                            target_length=batch["target_input_ids"].shape[1],
                            grid=tuple(int(g) for g in batch["query_image_grid_thw"][0]),
                            target_grid=tuple(int(g) for g in batch["target_image_grid_thw"][0]),
                            adapters=adapters, triplet=bool(loss.triplet_weight))["total"]

  objective = Objective(
      trainable=nnx.LoRAParam, dataset=ds, host_batch=host_batch,
      make_step=lambda graphdef, tx: step_lib.make_train_step(graphdef, tx, loss, num_chunks=num_chunks),
      flops=step_flops)
  result = fit(model, objective, loop=loop, optim=settings.optimizer(cfg.optim), seed=cfg.seed, out_dir=out_dir,
               eval_fn=eval_fn, mesh=mesh or parallel.mesh_from_config(cfg), stop_after=stop_after,
               sharding_rules=parallel.rules_from_config(cfg))
  adapter_dir = os.path.join(out_dir, "adapters")
  if result.steps == loop.steps and parallel.is_writer():
    # The base: the checkpoint the model was loaded from (the stages load common.foundation_checkpoint).
    peft_io.export_peft(model, adapter_dir, names=family.of_model(model).peft_names,
                        base_model_name_or_path=getattr(model, "name_or_path", None))
  return dataclasses.replace(result, adapter_dir=adapter_dir)


def _pace(steps_per_s: float, loop: LoopConfig, flops_per_step: Optional[int] = None,
          peak: Optional[hardware.Peak] = None) -> dict[str, float]:
  """Throughput since the loop (re)started: steps/s, examples/s where the loop has a global batch size, and with
  the step's analytic model FLOPs the achieved model TFLOP/s and its fraction of the devices' peak (MFU)."""
  pace = {"steps_per_s": steps_per_s}
  if loop.global_batch_size:
    pace["examples_per_s"] = steps_per_s * loop.global_batch_size
  if flops_per_step:
    pace["model_tflops_per_s"] = steps_per_s * flops_per_step / 1e12
    if peak is not None:
      pace["mfu"] = steps_per_s * flops_per_step / peak.total
  return pace


def fit(model, objective: Objective, *, loop: LoopConfig, optim: OptimConfig, seed: int, out_dir: str,
        eval_fn: Optional[EvalFn] = None, mesh: Optional[Mesh] = None, stop_after: Optional[int] = None,
        sharding_rules: Sequence[tuple[str, Sequence[Optional[str]]]] = ()) -> FitResult:
  """The loop both objectives share; updates `model` in place with the final (or best) trained parameters.

  loop: the schedule (steps, logging, checkpoint and eval intervals, data threads). optim: AdamW's settings.
  mesh: default all devices on the data axis. sharding_rules: (regex, PartitionSpec) for the frozen parameters
  (config `sharding.rules`; first match wins, default replicated); trained parameters are replicated.
  """
  t = loop
  mesh = mesh or parallel.make_mesh((-1, 1, 1))
  model.train()
  graphdef, trained, rng_state, rest = nnx.split(model, objective.trainable, nnx.RngState, ...)
  frozen = (parallel.replicate(rng_state, mesh), parallel.place_params(rest, mesh, sharding_rules))
  schedule = optim.schedule(t.steps)  # the rate AdamW applies
  tx = optim.optimizer(t.steps)
  pure = nnx.to_pure_dict(trained)
  # Every leaf (optimizer counters included) on the mesh, so fresh, stepped and restored states share one signature
  # and the step compiles once.
  state = parallel.replicate(initial_state(pure, tx, seed), mesh)
  iterator = pipeline.make_iterator(objective.dataset, num_threads=t.data_threads, prefetch=2,
                                    num_workers=t.data_workers)

  ckpt = Checkpoints(os.path.join(out_dir, "checkpoints"), keep=t.keep_checkpoints,
                     best_metric=t.best_metric if eval_fn else None)
  start = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(_abstract(state), data_iterator=iterator)
    start = int(meta["step"])
    if start > t.steps:
      raise ValueError(f"{ckpt.directory}: the checkpoint is at step {start}, past {t.section}.steps = {t.steps}; use "
                       f"another out_dir (or keep the steps) instead of a run made for more steps")
    log.info("[train] resumed from step %d (%s)", start, ckpt.latest_step())

  train_step = objective.make_step(graphdef, tx)
  flops_per_step, peak = None, None
  if objective.flops is not None:
    peak = hardware.peak(mesh.devices.size)
    if peak is None:
      log.warning("[train] no peak FLOP/s known for device kind %r (recall_jax.hardware.CHIP_PEAKS): model TFLOP/s "
                  "is logged, MFU is not", jax.devices()[0].device_kind)
    else:
      log.info("[train] MFU against %.1f TFLOP/s x %d devices (%s)", peak.flops_per_s / 1e12, peak.devices,
               peak.source)
  compiles = CompileCounter().start()
  writer = MetricWriter(out_dir, is_primary=parallel.is_writer())
  progress = Progress(t.steps)
  progress.start(start)
  interval = None  # clu metrics of the current logging interval, accumulated on device
  last_metrics: dict = {}
  done_here = 0
  try:
    with Preemption(ckpt.reached_preemption) as preemption:
      for step in range(start, t.steps):
        batch = next(iterator)
        if objective.flops is not None and flops_per_step is None:
          flops_per_step = objective.flops(batch)
        arrays, geometry = objective.host_batch(batch)
        arrays = parallel.host_to_global(arrays, mesh)  # this process's slice of the global batch
        with compiles.counting():
          # settle: a no-op but on multi-device CPU, where queued collective programs can deadlock.
          state, metrics = parallel.settle(train_step(state, frozen, arrays, geometry))
        faults.point("train.step")
        step_metrics = _collection(tuple(metrics)).single_from_model_output(**metrics)
        interval = step_metrics if interval is None else interval.merge(step_metrics)
        done_here += 1
        at_end = step + 1 == t.steps
        if (step + 1) % t.log_every == 0 or at_end:
          # The one host sync per logging interval: the interval's averages.
          means = {k: float(v) for k, v in interval.compute().items()}
          interval = None
          last_metrics = means
          pace = _pace(progress.rate(step + 1), t, flops_per_step, peak)
          writer.write(step + 1, {**means, **pace, "lr": float(schedule(step))},
                       prefix="train/", progress=progress.line(step + 1))
        # Evaluate before saving the step, and save every evaluated step with its scores (the best is kept by the
        # preservation policy): a crash during the eval resumes from the checkpoint before it and evaluates this
        # step again, as an uninterrupted run does.
        scores = None
        if eval_fn is not None and ((step + 1) % t.eval_every == 0 or at_end):
          scores = _evaluate(model, eval_fn, state["adapters"])
          writer.write(step + 1, scores, prefix="val/")
        preempted = preemption.reached(step + 1)
        if scores is not None or preempted or (step + 1) % t.checkpoint_every == 0 or at_end:
          ckpt.save(step + 1, state, data_iterator=iterator, metrics=scores)
          if scores is not None and t.best_metric and ckpt.best_step() == step + 1:  # "": logged, not selected
            log.info("[train] new best %s=%.3f at step %d", t.best_metric, scores[t.best_metric], step + 1)
        if preempted:
          log.warning("[train] SIGTERM: stopped after step %d and saved its checkpoint under %s; a rerun resumes "
                      "from it", step + 1, ckpt.directory)
          raise Preempted(step + 1, ckpt.directory)
        if stop_after and done_here >= stop_after and not at_end:
          break
      if preemption.requested:  # SIGTERM after the last step's save: the run is complete on disk
        raise Preempted(int(jax.device_get(state["step"])), ckpt.directory)
  except BaseException:
    ckpt.close()
    raise
  finally:
    writer.close()
    compiles.stop()

  best_step = ckpt.best_step()
  best_metrics = None
  final = state["adapters"]
  if best_step is not None:
    best_state, _ = ckpt.restore(_abstract(state), step=best_step)
    final, best_metrics = best_state["adapters"], ckpt.metrics(best_step)
  nnx.update(model, final)
  ckpt.close()
  model.eval()
  return FitResult(steps=int(jax.device_get(state["step"])), best_step=best_step, best_metrics=best_metrics,
                   last_metrics=last_metrics, compilations=compiles.count)


@functools.lru_cache(maxsize=None)
def _collection(keys: tuple[str, ...]):
  return clu_metrics.Collection.create(**{k: clu_metrics.Average.from_output(k) for k in keys})


def _evaluate(model, eval_fn: EvalFn, adapters) -> dict[str, float]:
  nnx.update(model, adapters)
  model.eval()
  try:
    return {k: float(v) for k, v in eval_fn(model).items()}
  finally:
    model.train()
