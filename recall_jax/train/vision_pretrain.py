"""Vision pretraining by attribute classification: the first phase of teaching a tiny foundation model the world.

A real MLLM's vision tower comes pretrained; the tiny random one reads nothing. Generative fine-tuning alone teaches
it slowly and, for yes/no questions, not at all (the model learns to ignore the image first; shared environment
notes). So the vision tower (and its patch merger) is first trained to classify each image's scene-graph attributes
from the mean of its merged tokens, one linear head per attribute, heads discarded afterwards. The labels are the
training split's scene graphs, the same facts the caption task teaches, as a denser signal.

Static shapes: one image bucket, a fixed batch of images, one compilation. Batches are drawn from (seed, step), so a
run is deterministic.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recall_jax.train import step as step_lib

log = logging.getLogger("recall_jax")


@dataclasses.dataclass(frozen=True)
class VisionPretrainConfig:
  steps: int
  batch_size: int = 64
  lr: float = 3e-3
  warmup_fraction: float = 0.05
  log_every: int = 100
  seed: int = 0


class AttributeHeads(nnx.Module):
  """One linear classifier per attribute over a pooled image feature."""

  def __init__(self, dim: int, classes: Sequence[int], *, rngs: nnx.Rngs):
    self.heads = nnx.List([nnx.Linear(dim, n, rngs=rngs) for n in classes])

  def __call__(self, feature: jax.Array) -> list[jax.Array]:
    return [head(feature) for head in self.heads]


class _Probe(nnx.Module):
  def __init__(self, visual: nnx.Module, heads: AttributeHeads):
    self.visual, self.heads = visual, heads


def _pooled(probe: _Probe, pixels: jax.Array, geometry) -> jax.Array:
  """(B, P, D) patches of B same-size images -> (B, H) mean of each image's merged tokens."""
  b = pixels.shape[0]
  tokens = probe.visual(pixels.reshape(-1, pixels.shape[-1]), geometry)
  return tokens.reshape(b, -1, tokens.shape[-1]).mean(axis=1)


def attribute_accuracy(probe_fn: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, labels: np.ndarray,
                       batch_size: int) -> np.ndarray:
  """Per-attribute accuracy of probe_fn (batch of pixels -> predicted labels) over full batches of `pixels`."""
  n = (len(pixels) // batch_size) * batch_size
  if n == 0:
    raise ValueError(f"need at least one full batch of {batch_size} images to score the vision probe")
  preds = np.concatenate([probe_fn(pixels[i:i + batch_size]) for i in range(0, n, batch_size)])
  return (preds == labels[:n]).mean(axis=0)


def pretrain_vision(model, pixels: np.ndarray, grid: tuple[int, int, int], labels: np.ndarray,
                    classes: Sequence[int], cfg: VisionPretrainConfig, *,
                    val: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
  """Trains model.visual in place on (pixels (N, P, D), labels (N, A)); returns the figures of the run.

  `grid` is the images' (t, h, w) patch grid (one bucket); `classes` the number of values of each of the A
  attributes. With `val` = (pixels, labels), the per-attribute accuracy of the probe on it is reported."""
  if cfg.steps < 1 or cfg.batch_size < 1 or cfg.batch_size > len(pixels):
    raise ValueError(f"vision pretraining needs steps >= 1 and 1 <= batch_size <= {len(pixels)} images, got "
                     f"steps={cfg.steps}, batch_size={cfg.batch_size} (config teach.vision)")
  geometry = step_lib.batch_geometry(model.cfg.vision, tuple(int(g) for g in grid), cfg.batch_size)
  probe = _Probe(model.visual, AttributeHeads(model.cfg.vision.out_hidden_size, classes,
                                              rngs=nnx.Rngs(cfg.seed)))
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, int(cfg.steps * cfg.warmup_fraction)), cfg.steps)
  optimizer = nnx.Optimizer(probe, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, 0.0)),
                            wrt=nnx.Param)

  @nnx.jit
  def train_step(probe, optimizer, x, y):
    def loss_fn(probe):
      logits = probe.heads(_pooled(probe, x, geometry))
      return sum(optax.softmax_cross_entropy_with_integer_labels(l, y[:, i]).mean() for i, l in enumerate(logits))
    loss, grads = nnx.value_and_grad(loss_fn)(probe)
    optimizer.update(probe, grads)
    return loss

  @nnx.jit
  def predict(probe, x):
    return jnp.stack([l.argmax(-1) for l in probe.heads(_pooled(probe, x, geometry))], axis=1)

  rng = np.random.default_rng(cfg.seed)
  t0 = time.perf_counter()
  losses = []
  for step in range(cfg.steps):
    index = rng.choice(len(pixels), cfg.batch_size, replace=False)
    losses.append(train_step(probe, optimizer, jnp.asarray(pixels[index]), jnp.asarray(labels[index])))
    if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
      rate = (step + 1) / (time.perf_counter() - t0)
      log.info("[teach] vision step %d/%d loss %.3f | %.2f steps/s, ETA %.0fs", step + 1, cfg.steps,
               float(losses[-1]), rate, (cfg.steps - step - 1) / rate)
  out = {"steps": cfg.steps, "final_loss": float(np.mean([float(l) for l in losses[-10:]])),
         "seconds": round(time.perf_counter() - t0, 1)}
  if val is not None:
    acc = attribute_accuracy(lambda x: np.asarray(predict(probe, jnp.asarray(x))), val[0], val[1], cfg.batch_size)
    out["val_accuracy"] = [float(a) for a in acc]
  return out


def labels_for(garments: Mapping[str, object], names: Sequence[str], attributes: Sequence[str],
               values: Mapping[str, Sequence[str]]) -> np.ndarray:
  """(N, A) int labels: the index of each image's value of each attribute."""
  return np.asarray([[list(values[a]).index(garments[n].get(a)) for a in attributes] for n in names], np.int32)
