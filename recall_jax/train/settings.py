"""What the training loop reads, as small frozen dataclasses built once from the config sections.

`trainer.fit` takes a `LoopConfig` and an `OptimConfig`, and the contrastive step a `step.LossConfig`, instead of
ConfigDicts: a stage that trains differently (teach's loop, refine's steps and loss weights) builds its own values
with `dataclasses.replace` rather than copying and overwriting the run config.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import optax
from ml_collections import ConfigDict

from recall_jax.train import optim
from recall_jax.train.step import LossConfig


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """The loop's schedule. `section` names the config section it came from, for error messages."""
  steps: int
  log_every: int
  checkpoint_every: int
  eval_every: int
  keep_checkpoints: int
  best_metric: str  # "": evaluations are logged, none is selected
  data_threads: int
  data_workers: int
  global_batch_size: Optional[int] = None  # examples per step, for the examples/s figure
  section: str = "train"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with warmup + cosine decay and global-norm clipping (`optim.make_optimizer`)."""
  lr: float
  warmup_fraction: float
  weight_decay: float
  b1: float
  b2: float
  clip_norm: Optional[float]

  def schedule(self, total_steps: int) -> optax.Schedule:
    return optim.learning_rate_schedule(self.lr, total_steps, self.warmup_fraction)

  def optimizer(self, total_steps: int) -> optax.GradientTransformation:
    return optim.make_optimizer(lr=self.lr, total_steps=total_steps, warmup_fraction=self.warmup_fraction,
                                weight_decay=self.weight_decay, b1=self.b1, b2=self.b2, clip_norm=self.clip_norm)


def train_loop(t: ConfigDict) -> LoopConfig:
  """Config `train`: the contrastive stages' loop (adapt, refine)."""
  return LoopConfig(steps=t.steps, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
                    eval_every=t.eval_every, keep_checkpoints=t.keep_checkpoints, best_metric=t.best_metric,
                    data_threads=t.data_threads, data_workers=t.data_workers, global_batch_size=t.global_batch_size)


def teach_loop(t: ConfigDict) -> LoopConfig:
  """Config `teach`: F's loop. Its evaluation is the image probe (every probe_every steps, none: only at the end
  when 0), which selects nothing; batches are built in-process."""
  return LoopConfig(steps=t.steps, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
                    eval_every=t.probe_every or t.steps, keep_checkpoints=t.keep_checkpoints, best_metric="",
                    data_threads=t.data_threads, data_workers=0, section="teach")


def optimizer(o: ConfigDict) -> OptimConfig:
  """Config `optim` (or `teach.optim`)."""
  return OptimConfig(lr=o.lr, warmup_fraction=o.warmup_fraction, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                     clip_norm=o.clip_norm)


def loss(c: ConfigDict) -> LossConfig:
  """Config `loss`."""
  return LossConfig(temperature=c.temperature, infonce_weight=c.infonce_weight, triplet_weight=c.triplet_weight,
                    margin=c.margin, symmetric=c.symmetric, mask_duplicate_targets=c.mask_duplicate_targets)
