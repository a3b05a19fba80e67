"""Activation checkpointing of a model's repeated blocks (decoder layers, vision blocks).

Under `jax.checkpoint` a block keeps only what its policy saves for the backward pass and recomputes the rest, so
a step's temporaries stop growing with depth x tokens at the cost of about one more forward. The policy is a config
value (model.remat), one of POLICIES:
  none          save everything (no recompute; the fastest, the most memory)
  full          save nothing inside a block: only its input is kept (the least memory, ~1 extra forward)
  dots          save every matmul output, recompute the element-wise work between them
  dots_no_batch save matmuls without batch dimensions (the weight matmuls, not attention's scores)
Inference (decoding with a cache, embedding without gradients) is unaffected: nothing is differentiated there.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
from flax import nnx

RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]

POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check(policy: str) -> str:
  if policy not in POLICIES:
    raise ValueError(f"remat policy must be one of {list(POLICIES)}, got {policy!r}")
  return policy


def _call(block: nnx.Module, *args: Any) -> Any:
  return block(*args)


def call(block: nnx.Module, policy: str, *args: Any) -> Any:
  """block(*args), under jax.checkpoint with `policy` unless it is "none"."""
  if policy == "none":
    return block(*args)
  return nnx.remat(_call, policy=POLICIES[policy])(block, *args)
