"""Checkpoints restore the train state and the Grain iterator position exactly; one manager keeps the newest steps
and the best evaluated one."""

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


def _steps(directory):
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_one_manager_keeps_the_newest_n_and_the_best(tmp_path):
  ckpt = Checkpoints(str(tmp_path), keep=2, best_metric="val/r1")
  abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  scores = {2: 0.5, 4: 0.4, 6: 0.3}  # evaluated steps; the others are periodic saves without metrics
  for step in range(1, 8):
    metrics = {"val/r1": scores[step], "val/r5": 1.0} if step in scores else None
    ckpt.save(step, {"w": jnp.full(3, float(step))}, metrics=metrics)
  assert ckpt.latest_step() == 7 and ckpt.best_step() == 2
  assert _steps(tmp_path) == [2, 6, 7]  # the newest two (6, 7) and the best (2); no second copy of it
  restored, meta = ckpt.restore(abstract, step=ckpt.best_step())
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.full(3, 2.0))
  assert meta["step"] == 2 and ckpt.metrics(2) == {"val/r1": 0.5, "val/r5": 1.0} and ckpt.metrics(7) is None
  ckpt.close()

  # A resumed run (a new manager over the same folder) still knows step 2's metrics and keeps it as the best.
  resumed = Checkpoints(str(tmp_path), keep=2, best_metric="val/r1")
  resumed.save(8, {"w": jnp.full(3, 8.0)})
  assert resumed.best_step() == 2 and _steps(tmp_path) == [2, 7, 8]
  resumed.save(9, {"w": jnp.full(3, 9.0)}, metrics={"val/r1": 0.9, "val/r5": 1.0})
  assert resumed.best_step() == 9 and _steps(tmp_path) == [8, 9]  # a better step replaces the best kept
  with pytest.raises(ValueError, match="'val/r1'.*not among the eval metrics \\['val/r5'\\]"):
    resumed.save(10, {"w": jnp.zeros(3)}, metrics={"val/r5": 1.0})
  assert Checkpoints(str(tmp_path), keep=2, best_metric="val/r5", best_mode="min").best_step() == 9  # tie: later
  assert Checkpoints(str(tmp_path), keep=2).best_step() is None  # no best metric: nothing selected


def test_the_former_two_folder_layout_is_a_clear_error(tmp_path):
  (tmp_path / "latest").mkdir()
  with pytest.raises(ValueError, match="holds latest/.*former two-folder layout"):
    Checkpoints(str(tmp_path))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    Checkpoints(str(tmp_path)).restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})


def test_schedule_warmup_then_cosine_to_zero():
  s = learning_rate_schedule(1e-3, total_steps=100, warmup_fraction=0.1)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 1e-3) < 1e-9 and float(s(100)) < 1e-9
  assert float(s(5)) == pytest.approx(5e-4) and float(s(55)) == pytest.approx(5e-4, rel=1e-3)
