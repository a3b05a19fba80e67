"""Mesh construction and regex sharding rules on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from recall_jax import parallel


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
  mesh = parallel.make_mesh((2, -1, 1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match="needs 16 devices"):
    parallel.make_mesh((4, 4, 1))
  with pytest.raises(ValueError, match="one entry per axis"):
    parallel.make_mesh((8,))


def test_rules_first_match_wins_and_indivisible_axes_are_replicated():
  mesh = parallel.make_mesh((2, 4, 1))
  rules = [(r"embed_tokens", ("fsdp", None)), (r"q_proj.*kernel", (None, "fsdp")), (r".*", ())]
  shard = parallel.param_shardings(
      {"language_model/embed_tokens/embedding": (512, 64), "layers/0/self_attn/q_proj/kernel": (64, 6),
       "layers/0/self_attn/q_proj/bias": (6,)}, mesh, rules)
  assert shard["language_model/embed_tokens/embedding"].spec == P("fsdp", None)
  assert shard["layers/0/self_attn/q_proj/kernel"].spec == P(None, None)  # 6 % 4 != 0 -> replicated
  assert shard["layers/0/self_attn/q_proj/bias"].spec == P(None)


def test_host_to_global_shards_batch_over_data_and_fsdp():
  mesh = parallel.make_mesh((2, 4, 1))
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = parallel.host_to_global({"x": x}, mesh)["x"]
  assert g.sharding.spec == P(("data", "fsdp"), None)
  assert len(g.addressable_shards) == 8 and g.addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(g), x)


def test_settle_waits_for_a_multi_device_cpu_program():
  # XLA:CPU can deadlock with several multi-device collective programs queued; settle is what keeps one in flight.
  mesh = parallel.make_mesh((2, 4, 1))
  x = jax.device_put(jnp.ones((512, 512)), NamedSharding(mesh, P(("data", "fsdp"))))

  @jax.jit
  def slow(x):
    for _ in range(30):
      x = jnp.tanh(jax.lax.with_sharding_constraint(x @ x.T, NamedSharding(mesh, P(None, ("data", "fsdp")))))
    return x.sum()

  out = parallel.settle({"loss": slow(x)})
  assert out["loss"].is_ready()
  single = jax.device_put(jnp.ones((4,)), jax.devices()[0])
  assert parallel.settle(single) is single  # one device: returned as it is


def test_host_to_global_shards_the_named_batch_axis_replicates_the_geometry_and_names_a_bad_batch():
  mesh = parallel.make_mesh((-1, 1, 1))
  positions = np.arange(3 * 8 * 2).reshape(3, 8, 2)
  g = parallel.host_to_global({"position_ids": positions, "vision": {"index": np.arange(5)}}, mesh,
                              batch_axes={"position_ids": 1}, global_rows=8)
  assert g["position_ids"].sharding.spec == P(None, ("data", "fsdp"), None)
  assert g["vision"]["index"].sharding.is_fully_replicated
  np.testing.assert_array_equal(parallel.to_host(g["position_ids"]), positions)
  with pytest.raises(ValueError, match=r"a batch of 6 rows .* 8 batch shards"):
    parallel.host_to_global({"x": np.zeros((6, 2))}, mesh)
