"""The NNX Qwen2.5-VL against the PyTorch reference (transformers) on tiny random checkpoints.

The tiny config has GQA (4 query heads over 2 KV heads), a vision window of 4 x 4 merged patches (so the test
images span several windows, one with padding) and a full-attention vision block.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from recall_jax.models.qwen2_5_vl import Qwen25VLModel, from_pretrained, tiny_config
from recall_jax.train.compiles import CompileCounter
from tests.models.qwen2_5_vl import reference as ref

# Row 0: two images of different sizes (4x6 and 5x3 merged patches); row 1: one image, left padded.
ROWS = [[5, (1, 8, 12), 3, (1, 10, 6), 4], [3, (1, 12, 8), 2]]


def assert_close(got, want, rtol, mask=None):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if mask is not None:
    got, want = got[mask], want[mask]
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= rtol * scale, (np.abs(got - want).max(), scale)


def _checkpoint(tmp_path_factory, tie: bool):
  cfg = tiny_config(tie_word_embeddings=tie)
  directory = str(tmp_path_factory.mktemp("tied" if tie else "untied"))
  return cfg, directory, ref.save_reference(cfg, directory)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  return _checkpoint(tmp_path_factory, tie=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
  return _checkpoint(tmp_path_factory, tie=True)


@pytest.fixture(params=["untied", "tied"])
def checkpoint(request):
  return request.getfixturevalue(request.param)


def test_fp32_matches_reference_with_images(checkpoint):
  cfg, directory, hf = checkpoint
  model = from_pretrained(directory)
  assert hasattr(model, "lm_head") != cfg.tie_word_embeddings
  batch = ref.make_batch(cfg, ROWS)
  geometry = model.prepare(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])["vision"]
  assert geometry["window_lengths"].size > len(batch["image_grid_thw"])  # several windows per image
  want = ref.reference_forward(hf, batch)
  got = model(**batch)
  mask = batch["attention_mask"].astype(bool)  # padded rows are not compared (transformers leaves them arbitrary)
  assert got.logits.shape == (2, batch["input_ids"].shape[1], cfg.text.vocab_size)
  assert got.hidden_states.shape == (2, batch["input_ids"].shape[1], cfg.text.hidden_size)
  assert_close(got.hidden_states, want["hidden_states"], 1e-4, mask)
  assert_close(got.logits, want["logits"], 1e-4, mask)
  assert np.isfinite(np.asarray(got.logits)).all()  # padded rows too


def test_fp32_matches_reference_text_only(tied):
  cfg, directory, hf = tied
  model = from_pretrained(directory)
  batch = ref.make_batch(cfg, [[7], [11], [3]], seed=1)
  want = ref.reference_forward(hf, batch)
  got = model(**batch)
  mask = batch["attention_mask"].astype(bool)
  assert_close(got.hidden_states, want["hidden_states"], 1e-4, mask)
  assert_close(got.logits, want["logits"], 1e-4, mask)


def test_sequential_positions_match_reference_given_1d_positions(untied):
  cfg, directory, hf = untied
  model = from_pretrained(directory, position_mode="sequential")
  batch = ref.make_batch(cfg, ROWS, seed=2)
  want = ref.reference_forward(hf, batch, position_mode="sequential")
  got = model(**batch)
  mask = batch["attention_mask"].astype(bool)
  assert_close(got.hidden_states, want["hidden_states"], 1e-4, mask)
  assert_close(got.logits, want["logits"], 1e-4, mask)
  # The positions really differ from M-RoPE's, so this test is not the mrope one in disguise.
  mrope = from_pretrained(directory)(**batch)
  assert np.abs(np.asarray(mrope.logits - got.logits))[mask].max() > 1e-3


def test_bf16_matches_reference(untied):
  cfg, directory, hf = untied
  model = from_pretrained(directory, dtype=jnp.bfloat16)
  batch = ref.make_batch(cfg, ROWS, seed=3)
  want32 = ref.reference_forward(hf, batch)
  want16 = ref.reference_forward(hf.to(torch.bfloat16), batch)
  hf.to(torch.float32)
  got = model(**batch)
  assert got.logits.dtype == jnp.bfloat16 and got.hidden_states.dtype == jnp.bfloat16
  mask = batch["attention_mask"].astype(bool)
  # bf16 has 8 mantissa bits; torch's own bf16 run is ~1% of scale away from fp32, as is ours.
  for want in (want16, want32):
    assert_close(got.hidden_states, want["hidden_states"], 2.5e-2, mask)
    assert_close(got.logits, want["logits"], 2.5e-2, mask)


def test_jit_compiles_once_per_image_bucket():
  """Counted with jax.monitoring's lowering events (train/compiles.py): a call with a bucket's shapes seen before
  lowers nothing, a new bucket lowers its forward once."""
  cfg = tiny_config(text=dict(num_hidden_layers=1), vision=dict(depth=1, fullatt_block_indexes=()))
  model = Qwen25VLModel(cfg, rngs=nnx.Rngs(0))
  bucket_a = [[4, (1, 8, 8), 3], [2, (1, 8, 8), 5]]
  bucket_b = [[4, (1, 8, 12), 3], [2, (1, 8, 12), 5]]
  batches = {(name, seed): ref.make_batch(cfg, bucket, seed=seed)
             for name, bucket in (("a", bucket_a), ("b", bucket_b)) for seed in range(3)}
  with CompileCounter() as counter:
    def lowered(name, seed):
      before = counter.count
      with counter.counting():
        model(**batches[name, seed])
      return counter.count - before
    assert lowered("a", 0) == 1  # the forward, one program
    assert [lowered("a", seed) for seed in (1, 2)] == [0, 0]  # same shapes, new tokens / pixels / padding
    assert lowered("b", 0) == 1  # a new bucket
    assert [lowered("b", 1), lowered("a", 2)] == [0, 0]


def test_prepare_rejects_mismatched_inputs():
  cfg = tiny_config(text=dict(num_hidden_layers=1), vision=dict(depth=1, fullatt_block_indexes=()))
  model = Qwen25VLModel(cfg, rngs=nnx.Rngs(0))
  batch = ref.make_batch(cfg, [[3, (1, 8, 8), 2]])
  with pytest.raises(ValueError, match="16 image tokens .* gives 24 merged patches"):
    model.prepare(batch["input_ids"], batch["attention_mask"], np.array([[1, 8, 12]]))
  with pytest.raises(ValueError, match="no image_grid_thw"):
    model.prepare(batch["input_ids"], batch["attention_mask"])
  with pytest.raises(ValueError, match="image_grid_thw given without pixel_values"):
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
          image_grid_thw=batch["image_grid_thw"])
