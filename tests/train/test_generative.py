"""The generative objective: the masked next-token loss equals transformers' loss, only answer tokens contribute,
and a few steps on a fixed batch train the selected parameters (and only those)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from recall_jax.data import pipeline
from recall_jax.generate import sft
from recall_jax.data.image import ImageBuckets
from recall_jax.models import qwen2_5_vl
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import build_tiny_tokenizer
from recall_jax.train import generative
from tests.models.qwen2_5_vl.reference import reference_position_ids, save_reference

LM_REGEX = r"language_model\..*|lm_head\..*"


@pytest.fixture(scope="module")
def batches(fashioniq_train):
  """One caption batch (1 image per example) and one verify batch (2 images) of the tiny world."""
  queries, images = fashioniq_train
  cfg = sft.SFTConfig(lengths=(128, 640), batch_size=2, tasks=("caption", "verify"))
  examples = sft.build_examples(queries, images, cfg, seed=0)
  enc = pipeline.EncodeConfig(image_buckets=ImageBuckets.square(56), query_lengths=(256,), target_lengths=(128,))
  ds = sft.sft_dataset(examples, load=pipeline.FileImages(images), tokenizer=build_tiny_tokenizer(), encode_cfg=enc,
                       cfg=cfg, seed=0)
  out = {}
  for i in range(len(examples)):
    batch = ds[i]
    out.setdefault(batch["image_grid_thw"].shape[1], batch)
    if len(out) == 2:
      return out
  raise AssertionError("no batches of both image counts")


@functools.partial(jax.jit, static_argnums=0)
def _loss(graphdef, state, arrays, geometry):
  logits = generative.logits(nnx.merge(graphdef, state), arrays, geometry)
  return generative.next_token_loss(logits, arrays["labels"])


def _jax_loss(model, batch):
  arrays, geometry = generative.host_batch(model.cfg, batch)
  graphdef, state = nnx.split(model)
  return _loss(graphdef, state, arrays, geometry)


@pytest.mark.parametrize("images", [1, 2])
def test_loss_equals_transformers(batches, tmp_path, images):
  cfg = qwen2_5_vl.tiny_config(text=dict(num_hidden_layers=1))
  reference = save_reference(cfg, str(tmp_path))
  model = qwen2_5_vl.from_pretrained(str(tmp_path))
  batch = batches[images]
  loss, metrics = _jax_loss(model, batch)

  flat = {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64),
          "image_grid_thw": batch["image_grid_thw"].reshape(-1, 3)}
  reference.model.rope_deltas = None
  with torch.no_grad():
    out = reference(input_ids=torch.from_numpy(flat["input_ids"]),
                    attention_mask=torch.from_numpy(flat["attention_mask"]),
                    position_ids=reference_position_ids(reference, flat),
                    pixel_values=torch.from_numpy(batch["pixel_values"].reshape(-1, batch["pixel_values"].shape[-1])),
                    image_grid_thw=torch.from_numpy(flat["image_grid_thw"]),
                    labels=torch.from_numpy(batch["labels"].astype(np.int64)))
  np.testing.assert_allclose(float(loss), float(out.loss), rtol=2e-5)
  assert int(metrics["answer_tokens"]) == int((batch["labels"][:, 1:] != sft.IGNORE).sum()) > 0


def test_only_answer_tokens_contribute():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((2, 7, 11)), jnp.float32)
  labels = np.full((2, 7), sft.IGNORE, np.int32)
  labels[0, 4:] = [1, 2, 3]
  labels[1, 6] = 5
  loss_fn = jax.jit(lambda x, y: generative.next_token_loss(x, y)[0])
  grad = jax.jit(jax.grad(loss_fn))(logits, jnp.asarray(labels))
  trained = labels[:, 1:] != sft.IGNORE  # position t predicts label t + 1
  assert np.all(np.abs(np.asarray(grad[:, :-1][trained])).sum(-1) > 0)
  np.testing.assert_array_equal(np.asarray(grad[:, :-1][~trained]), 0.0)
  np.testing.assert_array_equal(np.asarray(grad[:, -1]), 0.0)
  # Changing a prompt position's label (one that is IGNORE'd) or its logits changes nothing.
  loss = loss_fn(logits, jnp.asarray(labels))
  changed = np.asarray(logits).copy()
  changed[0, :3], changed[1, :5] = 100.0, -3.0
  assert float(loss_fn(jnp.asarray(changed), jnp.asarray(labels))) == float(loss)
  x = np.asarray(logits, np.float64)[:, :-1]
  lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  want = -np.mean([lp[0, 3, 1], lp[0, 4, 2], lp[0, 5, 3], lp[1, 5, 5]])
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)


def test_weighted_loss_is_the_weighted_mean_and_ones_are_the_plain_mean():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((2, 6, 9)), jnp.float32)
  labels = np.full((2, 6), sft.IGNORE, np.int32)
  labels[0, 3:] = [1, 2, 3]
  labels[1, 5] = 4
  plain = float(generative.next_token_loss(logits, jnp.asarray(labels))[0])
  ones = np.ones(labels.shape, np.float32)
  assert float(generative.next_token_loss(logits, jnp.asarray(labels), jnp.asarray(ones))[0]) == pytest.approx(plain)
  weights = ones.copy()
  weights[0, 4] = 10.0  # label 2 of row 0, predicted at position 3
  x = np.asarray(logits, np.float64)[:, :-1]
  lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  want = -(lp[0, 2, 1] + 10 * lp[0, 3, 2] + lp[0, 4, 3] + lp[1, 4, 4]) / 13
  got = float(generative.next_token_loss(logits, jnp.asarray(labels), jnp.asarray(weights))[0])
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_steps_on_a_fixed_batch_reduce_the_loss_and_train_only_the_selected_params(batches):
  model = qwen2_5_vl.Qwen25VLModel(qwen2_5_vl.tiny_config(text=dict(num_hidden_layers=1)), rngs=nnx.Rngs(0))
  graphdef, params, rng_state, rest = nnx.split(model, generative.params_matching(LM_REGEX), nnx.RngState, ...)
  tx = optax.adam(1e-2)
  pure = nnx.to_pure_dict(params)
  state = {"adapters": pure, "opt_state": tx.init(pure), "step": np.int32(0), "rng": np.zeros(2, np.uint32)}
  step = generative.make_train_step(graphdef, tx)
  arrays, geometry = generative.host_batch(model.cfg, batches[1])
  losses = []
  for _ in range(6):
    state, metrics = step(state, (rng_state, rest), arrays, geometry)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state["step"]) == 6
  nnx.update(model, state["adapters"])
  fresh = dict(nnx.to_flat_state(nnx.state(
      qwen2_5_vl.Qwen25VLModel(qwen2_5_vl.tiny_config(text=dict(num_hidden_layers=1)), rngs=nnx.Rngs(0)), nnx.Param)))
  now = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for k, v in now.items():
    if k[0] == "visual":  # not selected: frozen, bit-identical
      np.testing.assert_array_equal(np.asarray(v), np.asarray(fresh[k]), err_msg=str(k))
  assert not np.array_equal(np.asarray(now[("lm_head", "kernel")]), np.asarray(fresh[("lm_head", "kernel")]))


def test_a_batch_without_loss_weights_is_refused_not_given_plain_weights():
  with pytest.raises(KeyError, match="loss_weights"):
    generative.host_batch(None, {"labels": np.zeros((1, 4), np.int32), "input_ids": np.zeros((1, 4), np.int32)})
