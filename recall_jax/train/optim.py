"""The optimizer of the method: AdamW with warmup + cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import optax


def learning_rate_schedule(lr: float, total_steps: int, warmup_fraction: float) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_fraction` of the steps, then cosine decay to 0."""
  if total_steps <= 0:
    raise ValueError(f"optim: total_steps must be > 0, got {total_steps}")
  warmup = int(round(warmup_fraction * total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=0.0)


def make_optimizer(*, lr: float, total_steps: int, warmup_fraction: float = 0.1, weight_decay: float = 0.01,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   clip_norm: float | None = 1.0) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(lr, total_steps, warmup_fraction)
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm else adamw
