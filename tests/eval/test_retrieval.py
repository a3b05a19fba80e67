"""embed_in_batches: fixed-size padded batches, sharded over 8 fake CPU devices, equal to the unsharded result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from recall_jax import parallel
from recall_jax.eval.retrieval import embed_in_batches


def _items(n=37):
  rng = np.random.default_rng(0)
  return {"x": rng.normal(size=(n, 5)).astype(np.float32), "scale": rng.uniform(1, 2, size=(n,)).astype(np.float32)}


_W = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)


@jax.jit
def _embed(batch):
  e = (batch["x"] @ _W) * batch["scale"][:, None]
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def test_sharded_equals_unsharded_and_drops_padding():
  items = _items()
  seen = []

  def embed(batch):
    seen.append((batch["x"].shape, batch["x"].sharding))
    return _embed(batch)

  plain = embed_in_batches(embed, items, batch_size=16)
  assert plain.shape == (37, 4) and plain.dtype == np.float32
  assert [s[0] for s in seen] == [(16, 5)] * 3  # fixed shape, last batch padded
  direct = np.asarray(_embed(jax.tree.map(jnp.asarray, items)))
  np.testing.assert_allclose(plain, direct, rtol=0, atol=1e-5)  # unit vectors: scale 1

  seen.clear()
  mesh = parallel.make_mesh((8, 1, 1))
  sharded = embed_in_batches(embed, items, batch_size=16, mesh=mesh)
  assert all(s[1].spec == P(("data", "fsdp"), None) and len(s[1].device_set) == 8 for s in seen)
  np.testing.assert_allclose(sharded, plain, rtol=0, atol=1e-5)


def test_batch_must_divide_over_the_mesh():
  with pytest.raises(ValueError, match="batch_size 12 is not divisible by the 8 batch shards"):
    embed_in_batches(_embed, _items(), batch_size=12, mesh=parallel.make_mesh((2, 4, 1)))
  with pytest.raises(ValueError, match=r"embed_fn must return \(16, D\)"):
    embed_in_batches(lambda b: b["x"][:3], _items(), batch_size=16)
