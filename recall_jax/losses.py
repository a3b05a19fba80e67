"""Retrieval losses of ReCALL: global-batch InfoNCE and the in-group triplet loss (pure, jittable).

`info_nce` / `triplet` take global arrays (under jit they may be sharded any way; XLA partitions them).
`info_nce_sharded` / `triplet_sharded` compute the same values with `jax.shard_map`: each device keeps its queries
local and all-gathers the targets (all_gather is differentiable; its transpose is a reduce-scatter). Embeddings are
used as given (the embedding model L2-normalises them, so dot products are cosine similarities); all loss math is fp32.

Two masks: `valid` marks real slots (False = padding: no row, no negative), `query_valid` the slots whose query is a
loss row (default: every valid slot). A valid slot with query_valid False is an extra negative: its target stays a
negative column for every query, while its own query pairs with nothing (the hard-negative refinement ablation).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

Metrics = dict[str, jax.Array]
AxisName = str | Sequence[str]


def _ones(n: int) -> jax.Array:
  return jnp.ones((n,), bool)


def _masks(b: int, valid: jax.Array | None, query_valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(valid, query_valid) as bool arrays, query rows only among valid slots."""
  valid = _ones(b) if valid is None else valid.astype(bool)
  return valid, valid if query_valid is None else valid & query_valid.astype(bool)


def _info_nce_terms(q, t, temperature, row_ids, q_valid, t_valid, q_dup, t_dup):
  """Per-query InfoNCE terms of query rows `q` against all targets `t`; row_ids = each row's positive column."""
  sim = jnp.einsum("qd,td->qt", q.astype(jnp.float32), t.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  cols = jnp.arange(t.shape[0])
  positive = cols[None, :] == row_ids[:, None]
  # Negatives: real targets that are not this row's positive and not another copy of the same target image.
  negative = t_valid[None, :] & ~positive
  if q_dup is not None:
    negative &= q_dup[:, None] != t_dup[None, :]
  logits = sim / temperature
  candidate = negative | positive
  masked = jnp.where(candidate, logits, -jnp.inf)
  pos_logit = jnp.sum(jnp.where(positive, logits, 0.0), axis=1)
  row_loss = jax.nn.logsumexp(masked, axis=1) - pos_logit
  # Correct when the positive beats every negative (ties count as wrong).
  best_negative = jnp.max(jnp.where(negative, logits, -jnp.inf), axis=1)
  correct = pos_logit > best_negative
  rows = q_valid.astype(jnp.float32)
  neg_pairs = negative & q_valid[:, None]
  return {
      "loss_sum": jnp.sum(jnp.where(q_valid, row_loss, 0.0)),
      "correct": jnp.sum(jnp.where(q_valid, correct, False).astype(jnp.float32)),
      "rows": jnp.sum(rows),
      "pos_sim_sum": jnp.sum(jnp.where(q_valid, pos_logit * temperature, 0.0)),
      "neg_sim_sum": jnp.sum(jnp.where(neg_pairs, sim, 0.0)),
      "neg_pairs": jnp.sum(neg_pairs.astype(jnp.float32)),
  }


def _reduce_info_nce(terms: dict, reverse: dict | None) -> tuple[jax.Array, Metrics]:
  rows = jnp.maximum(terms["rows"], 1.0)
  loss = terms["loss_sum"] / rows
  metrics = {"accuracy": terms["correct"] / rows,
             "pos_sim": terms["pos_sim_sum"] / rows,
             "neg_sim": terms["neg_sim_sum"] / jnp.maximum(terms["neg_pairs"], 1.0)}
  if reverse is not None:
    reverse_loss = reverse["loss_sum"] / jnp.maximum(reverse["rows"], 1.0)
    metrics["loss_q2t"], metrics["loss_t2q"] = loss, reverse_loss
    loss = 0.5 * (loss + reverse_loss)
  metrics["loss"] = loss
  return loss, metrics


def info_nce(queries: jax.Array, targets: jax.Array, temperature: float, *, valid: jax.Array | None = None,
             query_valid: jax.Array | None = None, duplicate_ids: jax.Array | None = None,
             symmetric: bool = False) -> tuple[jax.Array, Metrics]:
  """Query->target InfoNCE over the whole batch: query i's positive is target i, every other target a negative.

  Args:
    queries, targets: (B, D) embeddings.
    temperature: logits = q . t / temperature.
    valid: (B,) bool; False marks a padded item: its row is left out of the mean and its target is no negative.
    query_valid: (B,) bool; False on a valid item makes it an extra negative: no row (nor, when symmetric, a
      query column), its target a negative for every row.
    duplicate_ids: (B,) int; items with equal ids share the target image, so target j is no negative for query i
      when duplicate_ids[i] == duplicate_ids[j] (i != j).
    symmetric: also add the target->query term (same masks) and average the two.
  Returns:
    (loss, metrics) with metrics loss, accuracy (positive ranked above every negative), pos_sim and neg_sim (mean
    cosine of positive / negative pairs), and loss_q2t / loss_t2q when symmetric.
  """
  b = queries.shape[0]
  valid, rows = _masks(b, valid, query_valid)
  ids = jnp.arange(b)
  terms = _info_nce_terms(queries, targets, temperature, ids, rows, valid, duplicate_ids, duplicate_ids)
  reverse = None
  if symmetric:  # target rows against query columns: only the items whose query is real take part
    reverse = _info_nce_terms(targets, queries, temperature, ids, rows, rows, duplicate_ids, duplicate_ids)
  return _reduce_info_nce(terms, reverse)


def _safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """L2 norm whose gradient at 0 is 0 (as torch's), not NaN."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _pairwise_distance(q: jax.Array, t: jax.Array) -> jax.Array:
  """||q_i - t_j|| for all pairs via |q|^2 + |t|^2 - 2 q.t (a (B, B, D) difference tensor would not fit)."""
  sq = (jnp.sum(jnp.square(q), -1)[:, None] + jnp.sum(jnp.square(t), -1)[None, :]
        - 2 * jnp.einsum("qd,td->qt", q, t, precision=jax.lax.Precision.HIGHEST))
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _triplet_terms(q, t_local, t_all, row_ids, group_local, group_all, valid_local, valid_all, margin):
  q = q.astype(jnp.float32)
  d_pos = _safe_norm(q - t_local.astype(jnp.float32))
  d_all = _pairwise_distance(q, t_all.astype(jnp.float32))
  cols = jnp.arange(t_all.shape[0])
  pair = ((group_local[:, None] == group_all[None, :]) & (cols[None, :] != row_ids[:, None])
          & valid_local[:, None] & valid_all[None, :])
  hinge = jnp.maximum(d_pos[:, None] - d_all + margin, 0.0)
  return jnp.sum(jnp.where(pair, hinge, 0.0)), jnp.sum(pair.astype(jnp.float32))


def triplet(queries: jax.Array, targets: jax.Array, group_ids: jax.Array, margin: float, *,
            valid: jax.Array | None = None, query_valid: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """In-group ordered-pair triplet loss of ReCALL's refinement stage.

  For every ordered pair (i, j), i != j, of valid items with the same group id: anchor q_i, positive t_i,
  negative t_j, hinge max(||q_i - t_i|| - ||q_i - t_j|| + margin, 0). The loss is the mean over all such pairs
  (groups weighted by their pair counts); 0 when the batch has no pair. Anchors are the query_valid items, so an
  extra negative (query_valid False) is only ever the negative t_j of its group's pairs.
  Returns (loss, metrics) with metrics triplet_loss and triplet_pairs.
  """
  b = queries.shape[0]
  valid, anchors = _masks(b, valid, query_valid)
  total, pairs = _triplet_terms(queries, targets, targets, jnp.arange(b), group_ids, group_ids, anchors, valid,
                                margin)
  loss = total / jnp.maximum(pairs, 1.0)
  return loss, {"triplet_loss": loss, "triplet_pairs": pairs}


# ----------------------------------------------------------------------------------------------------------------
# shard_map variants: queries stay local, targets (and the per-item ids) are all-gathered.


def _axis_tuple(axis: AxisName) -> tuple[str, ...]:
  return (axis,) if isinstance(axis, str) else tuple(axis)


def _local_row_ids(axis: tuple[str, ...], n_local: int) -> jax.Array:
  return jax.lax.axis_index(axis) * n_local + jnp.arange(n_local)


def _check_divisible(mesh: Mesh, axis: tuple[str, ...], batch: int, fn: str) -> None:
  shards = 1
  for name in axis:
    if name not in mesh.shape:
      raise ValueError(f"{fn}: mesh axis {name!r} not in mesh axes {tuple(mesh.shape)}")
    shards *= mesh.shape[name]
  if batch % shards:
    raise ValueError(f"{fn}: batch {batch} is not divisible by the {shards} shards of mesh axes {axis}")


def info_nce_sharded(queries: jax.Array, targets: jax.Array, temperature: float, *, mesh: Mesh, axis: AxisName,
                     valid: jax.Array | None = None, query_valid: jax.Array | None = None,
                     duplicate_ids: jax.Array | None = None, symmetric: bool = False) -> tuple[jax.Array, Metrics]:
  """`info_nce` with the batch sharded over mesh `axis` (a name or a tuple of names); same values and gradients."""
  axis = _axis_tuple(axis)
  b = queries.shape[0]
  _check_divisible(mesh, axis, b, "info_nce_sharded")
  valid, query_valid = _masks(b, valid, query_valid)
  dup = jnp.zeros((b,), jnp.int32) if duplicate_ids is None else duplicate_ids

  def local(q, t, v, qv, d):
    gather = lambda x: jax.lax.all_gather(x, axis, tiled=True)
    rows = _local_row_ids(axis, q.shape[0])
    d_local, d_all = (d, gather(d)) if duplicate_ids is not None else (None, None)
    terms = _info_nce_terms(q, gather(t), temperature, rows, qv, gather(v), d_local, d_all)
    terms = jax.lax.psum(terms, axis)
    reverse = None
    if symmetric:
      reverse = jax.lax.psum(_info_nce_terms(t, gather(q), temperature, rows, qv, gather(qv), d_local, d_all), axis)
    return _reduce_info_nce(terms, reverse)

  spec = P(axis)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=P())(
      queries, targets, valid, query_valid, dup)


def triplet_sharded(queries: jax.Array, targets: jax.Array, group_ids: jax.Array, margin: float, *, mesh: Mesh,
                    axis: AxisName, valid: jax.Array | None = None,
                    query_valid: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """`triplet` with the batch sharded over mesh `axis`; same values and gradients."""
  axis = _axis_tuple(axis)
  b = queries.shape[0]
  _check_divisible(mesh, axis, b, "triplet_sharded")
  valid, anchors = _masks(b, valid, query_valid)

  def local(q, t, g, v, a):
    gather = lambda x: jax.lax.all_gather(x, axis, tiled=True)
    rows = _local_row_ids(axis, q.shape[0])
    total, pairs = jax.lax.psum(_triplet_terms(q, t, gather(t), rows, g, gather(g), a, gather(v), margin), axis)
    loss = total / jnp.maximum(pairs, 1.0)
    return loss, {"triplet_loss": loss, "triplet_pairs": pairs}

  spec = P(axis)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=P())(
      queries, targets, group_ids, valid, anchors)
