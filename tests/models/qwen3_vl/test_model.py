"""The NNX Qwen3-VL against transformers' Qwen3VLForConditionalGeneration on tiny random checkpoints (fp32).

The tiny config has GQA (4 query heads over 2 KV heads), a 4 x 4 learned position table that the test grids
(up to 12 x 8 patches) must resample, and DeepStack taps feeding both decoder layers.
"""

import numpy as np
import pytest

from recall_jax.models import qwen3_vl
from recall_jax.models.qwen3_vl import from_pretrained, tiny_config
from tests.models.qwen2_5_vl.test_model import assert_close
from tests.models.qwen3_vl import reference as ref

# Row 0: two images of different sizes (4x6 and 5x3 merged patches); row 1: one image, left padded.
ROWS = [[5, (1, 8, 12), 3, (1, 10, 6), 4], [3, (1, 12, 8), 2]]


def _checkpoint(tmp_path_factory, tie: bool, **save_kwargs):
  cfg = tiny_config(tie_word_embeddings=tie)
  directory = str(tmp_path_factory.mktemp("tied" if tie else "untied"))
  return cfg, directory, ref.save_reference(cfg, directory, **save_kwargs)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  return _checkpoint(tmp_path_factory, tie=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
  return _checkpoint(tmp_path_factory, tie=True)


@pytest.fixture(params=["untied", "tied"])
def checkpoint(request):
  return request.getfixturevalue(request.param)


def test_vision_tower_and_deepstack_match_reference(untied):
  cfg, directory, hf = untied
  model = from_pretrained(directory)
  batch = ref.make_batch(cfg, ROWS)
  want, want_deepstack = ref.reference_vision(hf, batch)
  geometry = model.prepare(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])["vision"]
  got, got_deepstack = model.visual.features(batch["pixel_values"], geometry)
  assert len(got_deepstack) == len(want_deepstack) == 2
  assert_close(got, want, 1e-4)
  for g, w in zip(got_deepstack, want_deepstack):
    assert_close(g, w, 1e-4)


def test_fp32_matches_reference_with_images(checkpoint):
  cfg, directory, hf = checkpoint
  model = from_pretrained(directory)
  assert hasattr(model, "lm_head") != cfg.tie_word_embeddings
  batch = ref.make_batch(cfg, ROWS)
  want = ref.reference_forward(hf, batch)
  got = model(**batch)
  mask = batch["attention_mask"].astype(bool)  # padded positions are not compared (transformers leaves them arbitrary)
  assert got.logits.shape == (2, batch["input_ids"].shape[1], cfg.text.vocab_size)
  assert_close(got.hidden_states, want["hidden_states"], 1e-4, mask)
  assert_close(got.logits, want["logits"], 1e-4, mask)
  assert np.isfinite(np.asarray(got.logits)).all()


def test_deepstack_is_active(untied):
  """The DeepStack features move the output: without them the model is measurably different."""
  cfg, directory, _ = untied
  batch = ref.make_batch(cfg, ROWS, seed=4)
  with_taps = from_pretrained(directory)(**batch)
  model = from_pretrained(directory)
  inputs = model.prepare(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], batch["pixel_values"])
  x, _ = model.embed_inputs(inputs)
  plain = model.language_model(x, inputs["position_ids"], inputs["attention_mask"])
  mask = batch["attention_mask"].astype(bool)
  assert np.abs(np.asarray(plain - with_taps.hidden_states))[mask].max() > 1e-2


def test_fp32_matches_reference_text_only(tied):
  cfg, directory, hf = tied
  model = from_pretrained(directory)
  batch = ref.make_batch(cfg, [[7], [11], [3]], seed=1)
  want = ref.reference_forward(hf, batch)
  got = model(**batch)
  mask = batch["attention_mask"].astype(bool)
  assert_close(got.hidden_states, want["hidden_states"], 1e-4, mask)
  assert_close(got.logits, want["logits"], 1e-4, mask)


def test_sharded_checkpoint_loads_the_same(tmp_path):
  cfg = tiny_config()
  directory = str(tmp_path / "sharded")
  hf = ref.save_reference(cfg, directory, max_shard_size="100KB")
  import os
  assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
  batch = ref.make_batch(cfg, ROWS, seed=5)
  want = ref.reference_forward(hf, batch)
  got = from_pretrained(directory)(**batch)
  assert_close(got.logits, want["logits"], 1e-4, batch["attention_mask"].astype(bool))


def test_save_pretrained_round_trips_through_transformers(untied, tmp_path):
  cfg, directory, hf = untied
  model = from_pretrained(directory)
  out = str(tmp_path / "saved")
  qwen3_vl.save_pretrained(model, out)
  from transformers import Qwen3VLForConditionalGeneration
  reread = Qwen3VLForConditionalGeneration.from_pretrained(out).eval()
  batch = ref.make_batch(cfg, ROWS, seed=6)
  assert_close(ref.reference_forward(reread, batch)["logits"], ref.reference_forward(hf, batch)["logits"], 1e-6,
               batch["attention_mask"].astype(bool))
