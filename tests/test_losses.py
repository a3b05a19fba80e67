"""InfoNCE and triplet losses: numpy/loop references, and sharded == single-device on 8 fake CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from recall_jax import losses

B, D, TAU, MARGIN = 16, 8, 0.05, 0.2


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  q = _normalize(rng.standard_normal((B, D))).astype(np.float32)
  t = _normalize(q + 0.7 * rng.standard_normal((B, D))).astype(np.float32)
  valid = np.ones(B, bool)
  valid[[3, 10, 15]] = False
  dup = np.arange(B)
  dup[[5, 12]] = 100  # items 5 and 12 share a target image; so do 1 and 9.
  dup[[1, 9]] = 200
  groups = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5, 5, 6, 6, 6])
  return q, t, valid, dup, groups


def _extra_negatives(valid):
  """query_valid with items 2, 7 and 8 (valid ones) as extra negatives: targets only."""
  query_valid = valid.copy()
  query_valid[[2, 7, 8]] = False
  assert valid[[2, 7, 8]].all()
  return query_valid


def _info_nce_reference(q, t, tau, valid, dup, symmetric, query_valid=None):
  """Row-by-row float64 reference; rows are the query_valid items (default: the valid ones)."""
  q, t = q.astype(np.float64), t.astype(np.float64)
  rows = valid if query_valid is None else valid & query_valid

  def one_direction(a, b, cols):
    sim = a @ b.T
    losses_, correct, pos, neg = [], [], [], []
    for i in range(B):
      if not rows[i]:
        continue
      cand = [j for j in range(B) if cols[j] and (j == i or dup[j] != dup[i])]
      negs = [j for j in cand if j != i]
      logits = sim[i, cand] / tau
      losses_.append(np.log(np.sum(np.exp(logits))) - sim[i, i] / tau)
      correct.append(all(sim[i, i] > sim[i, j] for j in negs))
      pos.append(sim[i, i])
      neg.extend(sim[i, negs])
    return np.mean(losses_), np.mean(correct), np.mean(pos), np.mean(neg)

  loss, acc, pos, neg = one_direction(q, t, valid)
  if symmetric:  # target rows; only items with a real query are query columns
    loss = 0.5 * (loss + one_direction(t, q, rows)[0])
  return loss, acc, pos, neg


def _triplet_reference(q, t, groups, margin, valid, query_valid=None):
  q, t = q.astype(np.float64), t.astype(np.float64)
  anchors = valid if query_valid is None else valid & query_valid
  hinges = []
  for i in range(B):
    for j in range(B):
      if i != j and groups[i] == groups[j] and anchors[i] and valid[j]:
        hinges.append(max(np.linalg.norm(q[i] - t[i]) - np.linalg.norm(q[i] - t[j]) + margin, 0.0))
  return np.mean(hinges) if hinges else 0.0


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_info_nce_matches_numpy_reference(symmetric, masked):
  q, t, valid, dup, _ = _data()
  if not masked:
    valid, dup = np.ones(B, bool), np.arange(B)
  loss, metrics = jax.jit(functools.partial(losses.info_nce, temperature=TAU, symmetric=symmetric))(
      q, t, valid=valid if masked else None, duplicate_ids=dup if masked else None)
  ref_loss, acc, pos, neg = _info_nce_reference(q, t, TAU, valid, dup, symmetric)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)
  np.testing.assert_allclose(metrics["pos_sim"], pos, rtol=1e-5)
  np.testing.assert_allclose(metrics["neg_sim"], neg, rtol=1e-5, atol=1e-6)
  assert 0 < acc < 1  # the data makes some rows right and some wrong, so accuracy is really tested.


def test_info_nce_masks_change_the_loss():
  q, t, valid, dup, _ = _data()
  plain, _ = losses.info_nce(q, t, TAU)
  with_dup, _ = losses.info_nce(q, t, TAU, duplicate_ids=dup)
  with_valid, _ = losses.info_nce(q, t, TAU, valid=valid)
  assert with_dup < plain and abs(float(with_valid) - float(plain)) > 1e-3


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_extra_negative_columns(symmetric):
  """Hard-negative slots (query_valid False): their targets are negatives for every row, their queries no rows."""
  q, t, valid, dup, _ = _data(4)
  query_valid = _extra_negatives(valid)
  fn = jax.jit(functools.partial(losses.info_nce, temperature=TAU, symmetric=symmetric))
  loss, metrics = fn(q, t, valid=valid, query_valid=query_valid, duplicate_ids=dup)
  ref_loss, acc, pos, neg = _info_nce_reference(q, t, TAU, valid, dup, symmetric, query_valid)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)
  np.testing.assert_allclose(metrics["neg_sim"], neg, rtol=1e-5, atol=1e-6)
  # The same rows without the extra columns (the slots dropped as padding): a smaller denominator, a lower loss.
  without, _ = fn(q, t, valid=query_valid, duplicate_ids=dup)
  assert without < loss - 1e-3
  np.testing.assert_allclose(without, _info_nce_reference(q, t, TAU, query_valid, dup, symmetric)[0], rtol=1e-5)
  # Rows as with every slot a real query, but the columns differ: extra negatives are not just padding nor queries.
  all_rows, _ = fn(q, t, valid=valid, duplicate_ids=dup)
  assert abs(float(all_rows) - float(loss)) > 1e-3
  # Extra negatives get a gradient only on their target side.
  gq, gt = jax.grad(lambda q, t: fn(q, t, valid=valid, query_valid=query_valid, duplicate_ids=dup)[0],
                    argnums=(0, 1))(q, t)
  assert np.all(np.asarray(gq)[[2, 7, 8]] == 0) and np.all(np.abs(np.asarray(gt)[[2, 7, 8]]).sum(-1) > 0)


def test_triplet_extra_negatives_are_negatives_only():
  q, t, valid, _, groups = _data(5)
  query_valid = _extra_negatives(valid)
  loss, metrics = losses.triplet(q, t, groups, MARGIN, valid=valid, query_valid=query_valid)
  np.testing.assert_allclose(loss, _triplet_reference(q, t, groups, MARGIN, valid, query_valid), rtol=1e-5)
  anchors = valid & query_valid
  assert metrics["triplet_pairs"] == sum(int(anchors[i]) * (int(valid[groups == groups[i]].sum()) - 1)
                                         for i in range(B))


@pytest.mark.parametrize("masked", [False, True])
def test_triplet_matches_loop_reference(masked):
  q, t, valid, _, groups = _data(1)
  loss, metrics = jax.jit(functools.partial(losses.triplet, margin=MARGIN))(
      q, t, groups, valid=valid if masked else None)
  ref = _triplet_reference(q, t, groups, MARGIN, valid if masked else np.ones(B, bool))
  assert ref > 0
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  n_pairs = sum(int(c) * (int(c) - 1) for c in np.bincount(groups[valid] if masked else groups))
  assert metrics["triplet_pairs"] == n_pairs


def test_triplet_without_pairs_is_zero_with_finite_gradient():
  q, t, _, _, _ = _data()
  groups = np.arange(B)
  loss, metrics = jax.jit(losses.triplet, static_argnums=3)(q, t, groups, MARGIN)
  assert loss == 0 and metrics["triplet_pairs"] == 0
  g = jax.jit(jax.grad(lambda q: losses.triplet(q, q, np.zeros(B, int), MARGIN)[0]))(jnp.asarray(q))
  assert np.all(np.isfinite(g))  # ||q_i - t_i|| = 0 here: the safe norm keeps the gradient finite.


def _mesh(shape):
  names = ("data",) if len(shape) == 1 else ("data", "fsdp")
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), names), names


def _value_and_grads(fn, q, t):
  return jax.value_and_grad(lambda q, t: fn(q, t)[0], argnums=(0, 1))(q, t)


MESHES = [(8,), (2, 4)]


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("extra_negatives", [False, True])
def test_info_nce_sharded_equals_single_device(mesh_shape, symmetric, extra_negatives):
  q, t, valid, dup, _ = _data(2)
  query_valid = _extra_negatives(valid) if extra_negatives else valid
  single = jax.jit(lambda q, t: _value_and_grads(
      lambda q, t: losses.info_nce(q, t, TAU, valid=valid, query_valid=query_valid, duplicate_ids=dup,
                                   symmetric=symmetric), q, t))
  ref_loss, ref_grads = single(q, t)
  ref_metrics = losses.info_nce(q, t, TAU, valid=valid, query_valid=query_valid, duplicate_ids=dup,
                                symmetric=symmetric)[1]
  mesh, axis = _mesh(mesh_shape)
  sharding = NamedSharding(mesh, P(axis))
  qs, ts, vs, qvs, ds = (jax.device_put(x, sharding) for x in (q, t, valid, query_valid, dup))

  # Global arrays under jit (XLA partitions) and the shard_map variant.
  variants = {
      "global": lambda q, t, v, qv, d: losses.info_nce(q, t, TAU, valid=v, query_valid=qv, duplicate_ids=d,
                                                       symmetric=symmetric),
      "shard_map": lambda q, t, v, qv, d: losses.info_nce_sharded(q, t, TAU, mesh=mesh, axis=axis, valid=v,
                                                                  query_valid=qv, duplicate_ids=d,
                                                                  symmetric=symmetric),
  }
  for name, fn in variants.items():
    loss, grads = jax.jit(lambda q, t, v, qv, d: _value_and_grads(lambda q, t: fn(q, t, v, qv, d), q, t))(
        qs, ts, vs, qvs, ds)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=name)
    for g, r in zip(grads, ref_grads):
      np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=name)
      assert np.all(np.asarray(r)[~valid] == 0)  # padded items get no gradient.
    metrics = jax.jit(fn)(qs, ts, vs, qvs, ds)[1]
    for k, v in ref_metrics.items():
      np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("extra_negatives", [False, True])
def test_triplet_sharded_equals_single_device(mesh_shape, extra_negatives):
  q, t, valid, _, groups = _data(3)
  query_valid = _extra_negatives(valid) if extra_negatives else valid
  ref_loss, ref_grads = jax.jit(lambda q, t: _value_and_grads(
      lambda q, t: losses.triplet(q, t, groups, MARGIN, valid=valid, query_valid=query_valid), q, t))(q, t)
  assert ref_loss > 0
  mesh, axis = _mesh(mesh_shape)
  sharding = NamedSharding(mesh, P(axis))
  qs, ts, gs, vs, qvs = (jax.device_put(x, sharding) for x in (q, t, groups, valid, query_valid))
  variants = {
      "global": lambda q, t, g, v, qv: losses.triplet(q, t, g, MARGIN, valid=v, query_valid=qv),
      "shard_map": lambda q, t, g, v, qv: losses.triplet_sharded(q, t, g, MARGIN, mesh=mesh, axis=axis, valid=v,
                                                                 query_valid=qv),
  }
  for name, fn in variants.items():
    loss, grads = jax.jit(lambda q, t, g, v, qv: _value_and_grads(lambda q, t: fn(q, t, g, v, qv), q, t))(
        qs, ts, gs, vs, qvs)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=name)
    for g, r in zip(grads, ref_grads):
      np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=name)


def test_sharded_rejects_bad_axis_and_batch():
  mesh, _ = _mesh((8,))
  q, t, *_ = _data()
  with pytest.raises(ValueError, match="mesh axis 'fsdp' not in mesh axes"):
    losses.info_nce_sharded(q, t, TAU, mesh=mesh, axis="fsdp")
  with pytest.raises(ValueError, match="batch 12 is not divisible by the 8 shards"):
    losses.triplet_sharded(q[:12], t[:12], np.zeros(12, int), MARGIN, mesh=mesh, axis="data")
