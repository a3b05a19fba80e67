"""The decoder's one forward with a KV cache against the same forward without one, on a tiny random TextModel.

The Sampler (tests/generate/test_sampler.py) prefills the whole prompt at once and then steps one token; here the
prompt also arrives in chunks, so writes at a non-zero cache index of several tokens are checked too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recall_jax.generate import kv_cache
from recall_jax.models.qwen2_5_vl import tiny_config
from recall_jax.models.qwen2_5_vl.text import TextModel

BATCH, LENGTH, SLOTS = 2, 12, 16
CHUNKS = [(0, 7), (7, 11), (11, 12)]  # a prefill, a chunk written at index 7, one decode step


@pytest.fixture(scope="module")
def model_and_inputs():
  cfg = tiny_config().text
  model = TextModel(cfg, rngs=nnx.Rngs(0))
  embeds = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, cfg.hidden_size))
  attention_mask = np.ones((BATCH, LENGTH), np.int32)
  attention_mask[1, :3] = 0  # row 1 left padded
  # Three different position streams (as M-RoPE gives image tokens), counting only real tokens.
  counts = np.cumsum(attention_mask, axis=1) - 1
  position_ids = np.stack([counts, counts // 2, counts % 5]).astype(np.int32)
  return cfg, model, embeds, attention_mask, position_ids


def test_chunked_cached_forward_equals_uncached(model_and_inputs):
  cfg, model, embeds, attention_mask, position_ids = model_and_inputs
  want = np.asarray(model(embeds, position_ids, attention_mask))
  cache = kv_cache.init(cfg, BATCH, SLOTS, jnp.float32)
  got = []
  for start, stop in CHUNKS:
    hidden, cache = model(embeds[:, start:stop], position_ids[:, :, start:stop], attention_mask[:, start:stop],
                          cache=cache)
    got.append(np.asarray(hidden))
  got = np.concatenate(got, axis=1)
  real = attention_mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-5 * np.abs(want).max())
  assert int(cache.index) == LENGTH
  np.testing.assert_array_equal(np.asarray(cache.mask), np.pad(real, ((0, 0), (0, SLOTS - LENGTH))))
  # The unwritten slots stay empty.
  assert not np.any(np.asarray(cache.layers[0].k)[:, LENGTH:])


def test_cache_rejects_more_tokens_than_slots(model_and_inputs):
  cfg, model, embeds, attention_mask, position_ids = model_and_inputs
  cache = kv_cache.init(cfg, BATCH, LENGTH - 1, jnp.float32)
  with pytest.raises(ValueError, match="a KV cache of 11 slots cannot take 12 tokens"):
    model(embeds, position_ids, attention_mask, cache=cache)
