"""The contrastive training step: host-side batch layout, embedding of both sides, InfoNCE (+ triplet), optional
GradCache chunking, optax update of the adapters only.

Layout: every per-example array leads with the batch axis (position ids as (B, 3, L), pixels as (B, P, D)) so a
batch can be sharded over the data axes and cut into GradCache chunks; the vision geometry (host numpy, fixed by the
image bucket and the number of images per model call) is shared by all chunks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recall_jax import losses
from recall_jax.models import embedding
from recall_jax.models.qwen2_5_vl.positions import position_ids_for
from recall_jax.models.family import batch_geometry
from recall_jax.train import gradcache

SIDES = ("query", "target")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  temperature: float = 0.02
  infonce_weight: float = 1.0
  triplet_weight: float = 0.0
  margin: float = 0.05
  symmetric: bool = False
  mask_duplicate_targets: bool = True


def contrastive_loss(q: jax.Array, t: jax.Array, batch: dict[str, Any], cfg: LossConfig):
  """InfoNCE over the global batch (+ lambda * in-group triplet); padded slots masked out, extra-negative slots
  (query_valid False) are target columns only."""
  valid, query_valid = batch["valid"], batch.get("query_valid")
  loss, metrics = losses.info_nce(q, t, cfg.temperature, valid=valid, query_valid=query_valid,
                                  symmetric=cfg.symmetric,
                                  duplicate_ids=batch["target_ids"] if cfg.mask_duplicate_targets else None)
  total = cfg.infonce_weight * loss
  if cfg.triplet_weight:
    tloss, tmetrics = losses.triplet(q, t, batch["group_ids"], cfg.margin, valid=valid, query_valid=query_valid)
    total = total + cfg.triplet_weight * tloss
    metrics = {**metrics, **tmetrics}
  return total, {**metrics, "total_loss": total}


def host_batch(model_cfg, batch: dict[str, np.ndarray], *, images_per_call: int
               ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
  """A pipeline batch -> (per-example arrays, vision geometry per side for `images_per_call` images).

  All images of a side must share one bucket (one grid), so the pixel rows of a chunk concatenate exactly like the
  HF processor's."""
  out: dict[str, Any] = {}
  geometry = {}
  for side in SIDES:
    grids = np.asarray(batch[f"{side}_image_grid_thw"])
    if not np.all(grids == grids[:1]):
      raise ValueError(f"{side}_image_grid_thw: a training batch must hold one image bucket, got "
                       f"{sorted(set(map(tuple, grids.tolist())))}; use one bucket per side (data.image_buckets)")
    ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
    patches = int(np.prod(grids[0]))
    out[side] = {
        "input_ids": ids.astype(np.int32),
        "attention_mask": mask.astype(np.int32),
        "position_ids": np.swapaxes(position_ids_for(model_cfg, ids, mask, grids), 0, 1).astype(np.int32),
        "pixel_values": np.asarray(batch[f"{side}_pixel_values"][:, :patches], np.float32),
    }
    geometry[side] = batch_geometry(model_cfg.vision, tuple(int(g) for g in grids[0]), images_per_call)
  out["valid"] = np.asarray(batch["valid"], bool)
  out["query_valid"] = np.asarray(batch.get("query_valid", batch["valid"]), bool)
  out["target_ids"] = np.asarray(batch["target_ids"], np.int32)
  out["group_ids"] = np.asarray(batch["group_ids"], np.int32)
  return out, geometry


def model_inputs(arrays: dict[str, jax.Array], geometry: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The per-example layout of `host_batch` (position ids (B, 3, L), pixels (B, P, D)) -> `model.prepare`'s."""
  return {
      "input_ids": arrays["input_ids"],
      "attention_mask": arrays["attention_mask"],
      "position_ids": jnp.swapaxes(arrays["position_ids"], 0, 1),
      "pixel_values": arrays["pixel_values"].reshape(-1, arrays["pixel_values"].shape[-1]),
      "vision": geometry,
  }


def embed_side(model, side: dict[str, jax.Array], geometry: dict[str, jax.Array]) -> jax.Array:
  return embedding.embed(model, model_inputs(side, geometry))


def step_key(state) -> jax.Array:
  """The step's key: the carried state["rng"] (key data, checkpointed) folded with state["step"] on device, so
  every step draws new randomness and a resumed run the same as an uninterrupted one."""
  return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])


def reseeded(rng_state, key: jax.Array):
  """The model's RNG streams restarted from `key` (each stream its own fold): randomness as data, not mutation."""
  leaves, treedef = jax.tree.flatten(rng_state)
  fresh = [jax.random.fold_in(key, i) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else jnp.zeros_like(x)
           for i, x in enumerate(leaves)]
  return jax.tree.unflatten(treedef, fresh)


def make_grad_fn(graphdef: nnx.GraphDef, loss_cfg: LossConfig, *, num_chunks: int = 1):
  """Returns grad_fn(adapters, frozen, batch, geometry, key) -> ((loss, metrics), grads), not jitted.

  The gradient of the contrastive loss w.r.t. the adapters (a pure dict of the LoRA params), plain or, with
  num_chunks > 1, GradCache's (the geometry must then be for B / num_chunks images); `frozen` = (rng_state, base)
  from `nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)`. Dropout is per chunk (one model call draws one mask
  over its chunk): the model's streams restart from fold_in(key, chunk index), the same in both GradCache passes;
  the plain gradient is chunk 0's.
  """

  def embed_fn(adapters, frozen, geometry, sub, key):
    rng_state, base = frozen
    model = nnx.merge(graphdef, adapters, reseeded(rng_state, key), base)
    return embed_side(model, sub["query"], geometry["query"]), embed_side(model, sub["target"], geometry["target"])

  def loss_fn(q, t, batch):
    return contrastive_loss(q, t, batch, loss_cfg)

  def grad_fn(adapters, frozen, batch, geometry, key):
    if num_chunks > 1:
      return gradcache.gradcache_grads(
          lambda p, sub, chunk: embed_fn(p, frozen, geometry, sub, jax.random.fold_in(key, chunk)), loss_fn,
          adapters, batch, num_chunks)

    def full(p):
      q, t = embed_fn(p, frozen, geometry, batch, jax.random.fold_in(key, 0))
      return loss_fn(q, t, batch)

    return jax.value_and_grad(full, has_aux=True)(adapters)

  return grad_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_cfg: LossConfig, *,
                    num_chunks: int = 1):
  """Returns jitted step(state, frozen, batch, geometry) -> (state, metrics); `state` is donated.

  graphdef / frozen come from `nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)`: frozen = (rng_state, base).
  state = {"adapters": pure dict of the LoRA params, "opt_state", "step", "rng"}; the gradient is `make_grad_fn`'s
  (GradCache's with num_chunks > 1: the geometry must then be for B / num_chunks images). The carried state["rng"]
  is the one source of randomness: `step_key` folds in the step (new dropout masks every step, the same after a
  resume), `make_grad_fn` the chunk.
  """
  grad_fn = make_grad_fn(graphdef, loss_cfg, num_chunks=num_chunks)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, frozen, batch, geometry):
    template = state["adapters"]
    (loss, metrics), grads = grad_fn(template, frozen, batch, geometry, step_key(state))
    updates, opt_state = tx.update(grads, state["opt_state"], template)
    adapters = optax.apply_updates(template, updates)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
    return {"adapters": adapters, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}, metrics

  return step
