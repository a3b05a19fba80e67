"""Token sampling from next-token logits: greedy, temperature, top-k and top-p (nucleus), with explicit PRNG keys.

Pure, jittable functions; the settings are a frozen (hashable) dataclass so a jitted decode loop can take them as a
static argument. The order of the filters follows transformers: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 means greedy (argmax; top_k / top_p are then ignored); top_k 0 and top_p 1 switch them off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"sampling temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"sampling top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


GREEDY = SamplingConfig()


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """logits (B, V) fp32 -> temperature-scaled logits with the tokens top-k / top-p drop set to -inf."""
  logits = logits / cfg.temperature
  neg_inf = jnp.finfo(logits.dtype).min
  if cfg.top_k:
    kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if cfg.top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < cfg.top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg_inf, logits)
  return logits


def sample(logits: jax.Array, cfg: SamplingConfig, key: jax.Array) -> jax.Array:
  """One token id per row (B,) int32 from logits (B, V)."""
  logits = logits.astype(jnp.float32)
  if cfg.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)
