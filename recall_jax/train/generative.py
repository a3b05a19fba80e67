"""The generative objective: next-token cross-entropy on the assistant's answer tokens (fine-tuning the MLLM itself).

loss = mean over answer tokens of -log softmax(logits[t])[labels[t + 1]], logits in fp32; every position whose next
label is `sft.IGNORE` (prompt, image pads, padding, padding examples) contributes nothing. This is exactly the loss
transformers computes for `Qwen2_5_VLForConditionalGeneration(..., labels=labels)`. With teach.decision_weight != 1
the mean is weighted (sft's loss_weights): a yes/no decision is one token of a ~60-token describe-then-decide answer,
and at weight 1 a tiny F learns the readings but leaves the decision at chance.

Batches come from `recall_jax.generate.sft` (one image count per batch); `host_batch` lays them out like the contrastive
step's (batch axis first, so they shard over the data axes) with the vision geometry as static-shaped host numpy.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recall_jax.generate.sft import IGNORE
from recall_jax.models.qwen2_5_vl.positions import position_ids_for
from recall_jax.train import step as step_lib
from recall_jax.train.step import reseeded, step_key


def next_token_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """logits (B, L, V), labels (B, L) (IGNORE where not trained) -> (masked mean CE, metrics); shifted by one.

  weights (B, L), optional: a weighted mean over the trained tokens instead (sft's loss_weights; all ones = the
  plain mean)."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = labels[:, 1:]
  mask = targets != IGNORE
  safe = jnp.where(mask, targets, 0)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  count = jnp.maximum(mask.sum(), 1)
  w = mask.astype(jnp.float32) if weights is None else jnp.where(mask, weights[:, 1:].astype(jnp.float32), 0.0)
  loss = jnp.sum(jnp.where(mask, log_z - picked, 0.0) * w) / jnp.maximum(w.sum(), 1e-9)
  correct = jnp.where(mask, jnp.argmax(logits, axis=-1) == targets, False)
  return loss, {"loss": loss, "token_accuracy": correct.sum() / count, "answer_tokens": mask.sum()}


def params_matching(regex: str):
  """An nnx filter: the `nnx.Param`s whose dotted path (e.g. "language_model.layers.0.mlp.up_proj.kernel") fully
  matches `regex` (full fine-tuning of those parameters)."""
  pattern = re.compile(regex)

  def match(path, value) -> bool:
    return isinstance(value, nnx.Param) and bool(pattern.fullmatch(".".join(map(str, path))))

  return match


def host_batch(model_cfg, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """This process's SFT batch -> (per-example arrays, vision geometry of the global batch's B * k images: the
  geometry is replicated). All images must share one bucket."""
  if "loss_weights" not in batch:  # sft batches always carry them; a batch without them is not an SFT batch
    raise KeyError(f"an SFT batch needs 'loss_weights' (sft.sft_dataset writes them); got keys {sorted(batch)}")
  grids = np.asarray(batch["image_grid_thw"])
  b, k = grids.shape[:2]
  flat = grids.reshape(-1, 3)
  if not np.all(flat == flat[:1]):
    raise ValueError(f"image_grid_thw: an SFT batch must hold one image bucket, got "
                     f"{sorted(set(map(tuple, flat.tolist())))}; use one bucket (data.image_buckets)")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  patches = int(np.prod(flat[0]))
  arrays = {
      "input_ids": ids.astype(np.int32),
      "attention_mask": mask.astype(np.int32),
      "labels": np.asarray(batch["labels"], np.int32),
      "loss_weights": np.asarray(batch["loss_weights"], np.float32),
      "position_ids": np.swapaxes(position_ids_for(model_cfg, ids, mask, flat), 0, 1).astype(np.int32),
      "pixel_values": np.asarray(batch["pixel_values"][:, :, :patches], np.float32).reshape(b, k * patches, -1),
  }
  return arrays, step_lib.batch_geometry(model_cfg.vision, tuple(int(g) for g in flat[0]),
                                         b * jax.process_count() * k)


def logits(model, arrays: dict[str, jax.Array], geometry: dict[str, jax.Array]) -> jax.Array:
  """The model's fp32 logits (B, L, V) for a `host_batch` layout."""
  return model.logits(model.hidden_states(step_lib.model_inputs(arrays, geometry))).astype(jnp.float32)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
  """Returns jitted step(state, frozen, batch, geometry) -> (state, metrics); `state` is donated.

  graphdef / frozen come from `nnx.split(model, trainable, nnx.RngState, ...)`: frozen = (rng_state, rest);
  state = {"adapters": pure dict of the trained params, "opt_state", "step", "rng"} (the trainer's layout). Dropout
  (LoRA's) is per batch: the model's streams restart from `step_key(state)`, the carried key folded with the step.
  """

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, frozen, batch, geometry):
    rng_state, rest = frozen
    key = step_key(state)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, reseeded(rng_state, key), rest)
      return next_token_loss(logits(model, batch, geometry), batch["labels"], batch["loss_weights"])

    params = state["adapters"]
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
    return {"adapters": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1,
            "rng": state["rng"]}, metrics

  return step
