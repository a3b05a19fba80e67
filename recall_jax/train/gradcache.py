"""GradCache: contrastive-loss gradients for a large global batch with activation memory of one chunk.

The loss couples every item of the batch (InfoNCE over the global batch), so plain gradient accumulation does not
apply. GradCache (Gao et al., 2021) splits the step:
  1. embed every chunk without differentiation (no residuals kept),
  2. loss and its gradient w.r.t. the embeddings on the full batch (cheap: (B, D) embeddings),
  3. re-embed each chunk under `jax.vjp` and pull the cached embedding gradients back to the parameters,
     accumulating over chunks in a `lax.scan`.
Chunks are strided (item k goes to chunk k % num_chunks, MaxText's microbatch layout), so with a batch sharded over
the data axes each chunk holds an equal slice of every shard and all devices stay busy.

`embed_fn` must be a deterministic function of (params, sub_batch, chunk index): pass 1 and pass 2 must produce the
same embeddings. Randomness such as dropout therefore has to come from the chunk index (e.g. a key folded with it),
not from state that advances between calls.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
EmbedFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, jax.Array]]
LossFn = Callable[[jax.Array, jax.Array, PyTree], tuple[jax.Array, dict[str, jax.Array]]]


def _batch_size(batch: PyTree) -> int:
  sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f"gradcache: batch leaves disagree on the batch size: {sorted(sizes)}")
  return sizes.pop()


def to_chunks(x: jax.Array, num_chunks: int) -> jax.Array:
  """(B, ...) -> (num_chunks, B // num_chunks, ...) with chunk k = items k, k + num_chunks, k + 2 num_chunks, ..."""
  return jnp.swapaxes(x.reshape(x.shape[0] // num_chunks, num_chunks, *x.shape[1:]), 0, 1)


def from_chunks(x: jax.Array) -> jax.Array:
  """Inverse of `to_chunks`."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def gradcache_grads(embed_fn: EmbedFn, loss_fn: LossFn, params: PyTree, batch: PyTree,
                    num_chunks: int) -> tuple[tuple[jax.Array, dict[str, jax.Array]], PyTree]:
  """GradCache equivalent of `jax.value_and_grad(full_loss, has_aux=True)(params)`.

  Args:
    embed_fn: (params, sub_batch, chunk) -> (queries, targets), each (b, D) for a sub-batch of b items; chunk is
      the sub-batch's index (an int32 scalar), the same in both passes.
    loss_fn: (queries, targets, batch) -> (loss, metrics) on the full batch of B items.
    params: the pytree to differentiate (e.g. the adapter state of an NNX model).
    batch: pytree of arrays with a leading batch axis B, divisible by num_chunks.
    num_chunks: number of chunks; activation memory is that of B / num_chunks items.
  Returns:
    ((loss, metrics), grads) with grads shaped like params.
  """
  b = _batch_size(batch)
  if num_chunks <= 0 or b % num_chunks:
    raise ValueError(f"gradcache: batch size {b} is not divisible by num_chunks={num_chunks}")
  chunks = jax.tree.map(lambda x: to_chunks(x, num_chunks), batch)
  index = jnp.arange(num_chunks, dtype=jnp.int32)

  # Pass 1: embeddings only; nothing is differentiated, so no activations are kept.
  frozen = jax.lax.stop_gradient(params)
  queries, targets = jax.lax.map(lambda chunk: embed_fn(frozen, *chunk), (chunks, index))
  queries, targets = from_chunks(queries), from_chunks(targets)

  (loss, metrics), (q_grad, t_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      queries, targets, batch)
  q_grad, t_grad = to_chunks(q_grad, num_chunks), to_chunks(t_grad, num_chunks)

  # Pass 2: re-embed each chunk and pull the cached embedding gradients back to the parameters.
  def accumulate(acc, chunk):
    sub, k, dq, dt = chunk
    _, pullback = jax.vjp(lambda p: embed_fn(p, sub, k), params)
    (grads,) = pullback((dq, dt))
    return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads), None

  # Accumulate in fp32 so that bf16 parameters do not lose the small per-chunk contributions.
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
  grads, _ = jax.lax.scan(accumulate, zeros, (chunks, index, q_grad, t_grad))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return (loss, metrics), grads
