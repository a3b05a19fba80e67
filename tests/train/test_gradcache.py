"""GradCache: same gradients as the unchunked loss, and temp memory that does not grow with the batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from recall_jax import losses
from recall_jax.models import lora
from recall_jax.train import gradcache

SEQ, DIN, HIDDEN, DOUT = 6, 8, 16, 8


def _init_params(seed=0, hidden=HIDDEN, layers=2):
  keys = jax.random.split(jax.random.key(seed), layers + 1)
  dims = [DIN] + [hidden] * layers
  ws = [jax.random.normal(k, (a, b)) / np.sqrt(a) for k, a, b in zip(keys, dims[:-1], dims[1:])]
  return {"ws": ws, "out": jax.random.normal(keys[-1], (hidden, DOUT)) / np.sqrt(hidden)}


def _encode(params, tokens):
  """A token MLP + mean pooling + L2 norm: (b, SEQ, DIN) -> (b, DOUT)."""
  h = tokens
  for w in params["ws"]:
    h = jax.nn.gelu(h @ w)
  e = jnp.mean(h, axis=1) @ params["out"]
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def _embed(params, sub, chunk=None):
  return _encode(params, sub["query"]), _encode(params, sub["target"])


def _loss(q, t, batch):
  return losses.info_nce(q, t, 0.05, valid=batch["valid"], duplicate_ids=batch["dup"])


def _batch(b, seed=1):
  rng = np.random.default_rng(seed)
  query = rng.standard_normal((b, SEQ, DIN)).astype(np.float32)
  valid = np.ones(b, bool)
  valid[-3:] = False
  dup = np.arange(b)
  dup[[2, 7]] = -1
  return {"query": query, "target": query + 0.5 * rng.standard_normal(query.shape).astype(np.float32),
          "valid": valid, "dup": dup}


def _unchunked(params, batch):
  return jax.value_and_grad(lambda p: _loss(*_embed(p, batch), batch), has_aux=True)(params)


def _assert_grads_close(grads, ref):
  """Per leaf, at 1e-4 of the leaf's scale: chunked, sharded and plain are different programs (fp32 reduction-order
  noise here is ~2e-6 of the scale; a lost chunk's contribution is of the order of the scale)."""
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    scale = np.abs(np.asarray(r)).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(r) / scale, atol=1e-4)


def test_chunk_layout_is_strided_and_invertible():
  x = jnp.arange(12)
  chunks = gradcache.to_chunks(x, 3)
  np.testing.assert_array_equal(chunks, [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
  np.testing.assert_array_equal(gradcache.from_chunks(chunks), x)


@pytest.mark.parametrize("num_chunks", [1, 4, 8])
def test_gradients_equal_unchunked(num_chunks):
  params, batch = _init_params(), _batch(32)
  (ref_loss, ref_metrics), ref_grads = jax.jit(_unchunked)(params, batch)
  fn = jax.jit(functools.partial(gradcache.gradcache_grads, _embed, _loss, num_chunks=num_chunks))
  (loss, metrics), grads = fn(params, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], ref_metrics["accuracy"])
  _assert_grads_close(grads, ref_grads)


def test_randomness_from_the_chunk_index_is_the_same_in_both_passes():
  """Dropout keyed by fold_in(key, chunk): GradCache's gradient equals the plain one of a batch whose items get
  their chunk's mask, so both passes saw the same masks and each chunk its own."""
  key, b, n = jax.random.key(5), 16, 4
  params, batch = _init_params(), _batch(b)

  def mask(chunk, shape):
    return jax.random.bernoulli(jax.random.fold_in(key, chunk), 0.7, shape).astype(jnp.float32)

  def embed(p, sub, chunk):
    return _encode(p, sub["query"] * mask(chunk, sub["query"].shape)), _encode(p, sub["target"])

  full = gradcache.from_chunks(jnp.stack([mask(c, (b // n, SEQ, DIN)) for c in range(n)]))
  masked = {**batch, "query": batch["query"] * full}
  ref = jax.value_and_grad(lambda p: _loss(*_embed(p, masked), masked), has_aux=True)(params)
  (loss, _), grads = jax.jit(functools.partial(gradcache.gradcache_grads, embed, _loss, num_chunks=n))(params, batch)
  np.testing.assert_allclose(loss, ref[0][0], rtol=1e-5)
  _assert_grads_close(grads, ref[1])


def test_sharded_batch_gives_the_same_gradients():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  params, batch = _init_params(), _batch(64)
  ref = jax.jit(_unchunked)(params, batch)
  sharded = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))
  (loss, _), grads = jax.jit(functools.partial(gradcache.gradcache_grads, _embed, _loss, num_chunks=4))(
      params, sharded)
  np.testing.assert_allclose(loss, ref[0][0], rtol=1e-5)
  _assert_grads_close(grads, ref[1])


class _Encoder(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(DIN, HIDDEN, rngs=rngs)
    self.fc2 = nnx.Linear(HIDDEN, DOUT, rngs=rngs)

  def __call__(self, tokens):
    e = self.fc2(jnp.mean(jax.nn.gelu(self.fc1(tokens)), axis=1))
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def test_nnx_dora_adapters_only():
  """The intended use: differentiate the adapter state of an NNX model, the base state stays closed over."""
  model = _Encoder(nnx.Rngs(0))
  lora.apply_lora(model, r"fc1|fc2", rank=4, alpha=8, use_dora=True, rngs=nnx.Rngs(1))
  for m in lora.lora_modules(model).values():
    m.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(2), m.lora_b.shape)
  graph, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)

  def embed(p, sub, chunk=None):
    encoder = nnx.merge(graph, p, rest)
    return encoder(sub["query"]), encoder(sub["target"])

  batch = _batch(16)
  ref = jax.jit(jax.value_and_grad(lambda p: _loss(*embed(p, batch), batch), has_aux=True))(adapters)
  (loss, _), grads = jax.jit(functools.partial(gradcache.gradcache_grads, embed, _loss, num_chunks=4))(
      adapters, batch)
  np.testing.assert_allclose(loss, ref[0][0], rtol=1e-5)
  assert {p[-1] for p, _ in nnx.to_flat_state(grads)} == {"lora_a", "lora_b", "lora_magnitude"}
  _assert_grads_close(grads, ref[1])


def test_rejects_indivisible_batch():
  with pytest.raises(ValueError, match="batch size 30 is not divisible by num_chunks=4"):
    gradcache.gradcache_grads(_embed, _loss, _init_params(), _batch(30), 4)


def _temp_bytes(fn, params, batch):
  return fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes


def test_temp_memory_flat_in_batch_size_with_fixed_chunk():
  """Compiled temp memory: GradCache with a fixed chunk of 32 barely grows from 64 to 512; plain grad grows ~8x."""
  chunk, seq, hidden = 32, 64, 256
  params = _init_params(hidden=hidden, layers=3)

  def batch_spec(b):
    x = jax.ShapeDtypeStruct((b, seq, DIN), jnp.float32)
    return {"query": x, "target": x, "valid": jax.ShapeDtypeStruct((b,), bool),
            "dup": jax.ShapeDtypeStruct((b,), jnp.int32)}

  cached, plain = {}, {}
  for b in (64, 512):
    fn = jax.jit(functools.partial(gradcache.gradcache_grads, _embed, _loss, num_chunks=b // chunk))
    cached[b] = _temp_bytes(fn, params, batch_spec(b))
    plain[b] = _temp_bytes(jax.jit(_unchunked), params, batch_spec(b))
  # Activations of one chunk: 2 encoders x chunk x seq x hidden x 3 layers x fp32 = 12 MiB; the full batch of 512
  # would need 8x that. What is left to grow is the (B, D) embeddings and the (B, B) similarity matrix (1 MiB).
  assert plain[512] > 6 * plain[64], plain
  assert cached[512] < 1.5 * cached[64], cached
  assert cached[512] < plain[512] / 4, (cached, plain)
