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


def _info_nce_reference(q, t, tau, valid, dup, symmetric):
  """Row-by-row float64 reference."""
  q, t = q.astype(np.float64), t.astype(np.float64)

  def one_direction(a, b):
    sim = a @ b.T
    losses_, correct, pos, neg = [], [], [], []
    for i in range(B):
      if not valid[i]:
        continue
      cand = [j for j in range(B) if valid[j] and (j == i or dup[j] != dup[i])]
      negs = [j for j in cand if j != i]
      logits = sim[i, cand] / tau
      losses_.append(np.log(np.sum(np.exp(logits))) - sim[i, i] / tau)
      correct.append(all(sim[i, i] > sim[i, j] for j in negs))
      pos.append(sim[i, i])
      neg.extend(sim[i, negs])
    return np.mean(losses_), np.mean(correct), np.mean(pos), np.mean(neg)

  loss, acc, pos, neg = one_direction(q, t)
  if symmetric:
    loss = 0.5 * (loss + one_direction(t, q)[0])
  return loss, acc, pos, neg


def _triplet_reference(q, t, groups, margin, valid):
  q, t = q.astype(np.float64), t.astype(np.float64)
  hinges = []
  for i in range(B):
    for j in range(B):
      if i != j and groups[i] == groups[j] and valid[i] and valid[j]:
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
def test_info_nce_sharded_equals_single_device(mesh_shape, symmetric):
  q, t, valid, dup, _ = _data(2)
  single = jax.jit(lambda q, t: _value_and_grads(
      lambda q, t: losses.info_nce(q, t, TAU, valid=valid, duplicate_ids=dup, symmetric=symmetric), q, t))
  ref_loss, ref_grads = single(q, t)
  ref_metrics = losses.info_nce(q, t, TAU, valid=valid, duplicate_ids=dup, symmetric=symmetric)[1]
  mesh, axis = _mesh(mesh_shape)
  sharding = NamedSharding(mesh, P(axis))
  qs, ts, vs, ds = (jax.device_put(x, sharding) for x in (q, t, valid, dup))

  # Global arrays under jit (XLA partitions) and the shard_map variant.
  variants = {
      "global": lambda q, t, v, d: losses.info_nce(q, t, TAU, valid=v, duplicate_ids=d, symmetric=symmetric),
      "shard_map": lambda q, t, v, d: losses.info_nce_sharded(q, t, TAU, mesh=mesh, axis=axis, valid=v,
                                                              duplicate_ids=d, symmetric=symmetric),
  }
  for name, fn in variants.items():
    loss, grads = jax.jit(lambda q, t, v, d: _value_and_grads(lambda q, t: fn(q, t, v, d), q, t))(qs, ts, vs, ds)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=name)
    for g, r in zip(grads, ref_grads):
      np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=name)
      assert np.all(np.asarray(r)[~valid] == 0)  # padded items get no gradient.
    metrics = jax.jit(fn)(qs, ts, vs, ds)[1]
    for k, v in ref_metrics.items():
      np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_triplet_sharded_equals_single_device(mesh_shape):
  q, t, valid, _, groups = _data(3)
  ref_loss, ref_grads = jax.jit(lambda q, t: _value_and_grads(
      lambda q, t: losses.triplet(q, t, groups, MARGIN, valid=valid), q, t))(q, t)
  assert ref_loss > 0
  mesh, axis = _mesh(mesh_shape)
  sharding = NamedSharding(mesh, P(axis))
  qs, ts, gs, vs = (jax.device_put(x, sharding) for x in (q, t, groups, valid))
  variants = {
      "global": lambda q, t, g, v: losses.triplet(q, t, g, MARGIN, valid=v),
      "shard_map": lambda q, t, g, v: losses.triplet_sharded(q, t, g, MARGIN, mesh=mesh, axis=axis, valid=v),
  }
  for name, fn in variants.items():
    loss, grads = jax.jit(lambda q, t, g, v: _value_and_grads(lambda q, t: fn(q, t, g, v), q, t))(qs, ts, gs, vs)
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
