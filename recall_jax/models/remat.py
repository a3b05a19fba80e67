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


def call(block: nnx.Module, policy: str, *args: Any) -> Any:
  """block(*args), under jax.checkpoint with `policy` unless it is "none".

  The block runs as a pure function of its state (split / merge around `jax.checkpoint`) rather than through
  `nnx.remat`, which writes every variable back afterwards and so fails on parameters that are tracers of an outer
  transform (the training step's grad / GradCache's vjp): "Cannot mutate Param from a different trace level". What
  the block may change (dropout's RNG counts) is written back; its parameters are not.
  """
  if policy == "none":
    return block(*args)
  graphdef, params, rest = nnx.split(block, nnx.Param, ...)

  def pure(params, rest, *args):
    module = nnx.merge(graphdef, params, rest)
    out = module(*args)
    return out, nnx.state(module, nnx.Not(nnx.Param))

  out, rest = jax.checkpoint(pure, policy=POLICIES[policy])(params, rest, *args)
  nnx.update(block, rest)
  return out
