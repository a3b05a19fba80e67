"""The compile counter reads jax.monitoring's lowering events: it counts what a call lowers, and only inside
counting()."""

import jax
import jax.numpy as jnp
import numpy as np

from recall_jax.train.compiles import CompileCounter


def test_counts_new_signatures_only_inside_counting():
  x3, x4 = jnp.ones(3), jnp.ones(4)  # created outside, so their own programs are not counted
  with CompileCounter() as counter:
    f = jax.jit(lambda a: jnp.sin(a) * 2)
    with counter.counting():
      f(x3).block_until_ready()
    assert counter.count == 1
    with counter.counting():
      f(x3).block_until_ready()  # cached: nothing lowered
    assert counter.count == 1
    with counter.counting():
      f(x4).block_until_ready()  # a new shape: one more program
    assert counter.count == 2
    jax.jit(lambda a: a + 1)(x3).block_until_ready()  # outside counting(): not counted
    assert counter.count == 2
  # Stopped: the listener is gone.
  g = jax.jit(lambda a: a - 1)
  g(np.ones(5, np.float32)).block_until_ready()
  assert counter.count == 2
