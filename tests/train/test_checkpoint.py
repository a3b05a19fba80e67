"""Checkpoints restore the train state and the Grain iterator position exactly; best/ keeps the best metric."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.train.checkpoint import Checkpoints
from recall_jax.train.optim import learning_rate_schedule


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4))


def test_state_and_data_iterator_round_trip(tmp_path):
  ckpt = Checkpoints(str(tmp_path), keep=2)
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(7), "rng": jax.random.key_data(jax.random.key(1))}
  it = _iterator()
  for _ in range(3):
    next(it)
  ckpt.save(7, state, data_iterator=it, meta={"note": "x"})
  expected_next = [next(it) for _ in range(2)]

  fresh = _iterator()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored, meta = ckpt.restore(abstract, data_iterator=fresh)
  assert meta["step"] == 7 and meta["note"] == "x"
  for k in state:
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
  for want in expected_next:
    np.testing.assert_array_equal(next(fresh), want)


def test_keep_n_and_best(tmp_path):
  ckpt = Checkpoints(str(tmp_path), keep=2, best_metric="val/r1")
  state = {"w": jnp.zeros(3)}
  for step in (1, 2, 3):
    ckpt.save(step, {"w": jnp.full(3, float(step))})
  assert ckpt.latest_step() == 3
  assert sorted(p.name for p in (tmp_path / "latest").iterdir() if p.name.isdigit()) == ["2", "3"]
  assert ckpt.save_best(1, {"w": jnp.full(3, 1.0)}, {"val/r1": 0.2})
  assert ckpt.save_best(2, {"w": jnp.full(3, 2.0)}, {"val/r1": 0.5})
  assert not ckpt.save_best(3, {"w": jnp.full(3, 3.0)}, {"val/r1": 0.4})
  assert ckpt.best_step() == 2
  restored, meta = ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), best=True)
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.full(3, 2.0))
  assert meta["metrics"]["val/r1"] == 0.5


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    Checkpoints(str(tmp_path)).restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})


def test_schedule_warmup_then_cosine_to_zero():
  s = learning_rate_schedule(1e-3, total_steps=100, warmup_fraction=0.1)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 1e-3) < 1e-9 and float(s(100)) < 1e-9
  assert float(s(5)) == pytest.approx(5e-4) and float(s(55)) == pytest.approx(5e-4, rel=1e-3)
