"""Qwen3-VL through the family-agnostic machinery, against transformers (+ peft) on tiny random checkpoints:
greedy decoding equals `generate`, peft adapters import and export with equal outputs, and the image
preprocessing equals transformers' image processor for a checkpoint we write."""

import numpy as np
import peft
import pytest
from flax import nnx
from PIL import Image
from transformers import AutoImageProcessor

from recall_jax.data.image import preprocess_images
from recall_jax.generate import Sampler
from recall_jax.models import lora, peft_io
from recall_jax.models.qwen3_vl import Qwen3VLModel, from_pretrained, names, save_pretrained, tiny_config
from recall_jax.models.qwen3_vl.params import IMAGE_MEAN, IMAGE_STD
from tests.generate.test_sampler import (NEW, PAD, assert_argmax_well_posed, assert_step_logits_close,
                                         expected_lengths, generate, hf_generate)
from tests.models.qwen3_vl import reference as ref

ROWS = [[5, (1, 8, 12), 3, (1, 10, 6), 4], [3, (1, 12, 8), 2], [6]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  cfg = tiny_config()
  directory = str(tmp_path_factory.mktemp("qwen3"))
  return cfg, directory, ref.save_reference(cfg, directory)


def test_greedy_matches_transformers_generate(checkpoint):
  cfg, directory, hf = checkpoint
  batch = ref.make_batch(cfg, ROWS, seed=1)
  free, _ = hf_generate(hf, batch, NEW, eos_ids=None)
  eos = sorted({int(free[0, 2]), int(free[1, 4])})
  want, want_logits = hf_generate(hf, batch, NEW, eos_ids=eos)
  assert_argmax_well_posed(want_logits[np.arange(NEW) < expected_lengths(want, eos)[:, None]])
  out = generate(Sampler(from_pretrained(directory), eos_ids=eos, pad_id=PAD), batch, max_new_tokens=NEW,
                 return_logits=True)
  np.testing.assert_array_equal(np.asarray(out.tokens), want)
  lengths = np.asarray(out.lengths)
  np.testing.assert_array_equal(lengths, expected_lengths(want, eos))
  assert lengths.min() < NEW
  assert_step_logits_close(np.asarray(out.logits), want_logits, lengths)


def test_peft_dora_import_export_and_merge(checkpoint, tmp_path):
  cfg, directory, _ = checkpoint
  hf = ref.build_reference(cfg)
  target = (r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.down_proj)"
            r"|.*visual\.blocks\.\d+\.mlp\.linear_fc2")
  pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, use_dora=True, init_lora_weights="gaussian",
                                               target_modules=target))
  from tests.models.test_peft_io import _randomize_peft
  pm = _randomize_peft(pm, seed=3)
  pm.save_pretrained(str(tmp_path / "peft"))

  model = from_pretrained(directory)
  paths = peft_io.import_peft(model, str(tmp_path / "peft"), names=names.PEFT_NAMES)
  assert paths == lora.apply_lora(from_pretrained(directory), names.LORA_TARGET_REGEX, rank=2, alpha=2,
                                  rngs=nnx.Rngs(0))
  assert len(paths) == 5 * cfg.text.num_hidden_layers + cfg.vision.depth

  batch = ref.make_batch(cfg, [[3, (1, 8, 8), 2], [4, (1, 4, 8), 5]])
  mask = batch["attention_mask"].astype(bool)
  want = ref.reference_forward(hf, batch)["hidden_states"][mask]
  got = np.asarray(model(**batch).hidden_states)[mask]
  scale = np.abs(want).max()
  with pm.disable_adapter():
    base = ref.reference_forward(hf, batch)["hidden_states"][mask]
  assert np.abs(base - want).max() > 1e-2 * scale  # the adapters really change the output
  np.testing.assert_allclose(got / scale, want / scale, atol=1e-5)

  peft_io.export_peft(model, str(tmp_path / "out"), names=names.PEFT_NAMES, base_model_name_or_path=directory)
  hf2 = ref.build_reference(cfg)
  peft.PeftModel.from_pretrained(hf2, str(tmp_path / "out"))
  np.testing.assert_allclose(ref.reference_forward(hf2, batch)["hidden_states"][mask] / scale, got / scale,
                             atol=1e-5)
  lora.merge_lora(model)
  np.testing.assert_allclose(np.asarray(model(**batch).hidden_states)[mask] / scale, got / scale, atol=1e-5)


def test_preprocessing_equals_the_qwen3_vl_image_processor(tmp_path):
  cfg = tiny_config()
  save_pretrained(Qwen3VLModel(cfg, rngs=nnx.Rngs(0)), str(tmp_path))
  processor = AutoImageProcessor.from_pretrained(str(tmp_path))
  assert type(processor).__name__.startswith("Qwen2VLImageProcessor")  # what transformers maps qwen3_vl to
  kw = dict(patch_size=16, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
  rgba = np.random.default_rng(0).integers(0, 256, (90, 130, 4), dtype=np.uint8)
  image = Image.fromarray(rgba)
  want_pixels, want_grid = preprocess_images([image], **kw)
  got = processor(images=[image], return_tensors="np")
  assert want_grid.tolist() == [[1, 6, 8]]  # smart-resized to multiples of 32 (96 x 128)
  np.testing.assert_array_equal(got["image_grid_thw"], want_grid)
  np.testing.assert_array_equal(got["pixel_values"], want_pixels)
  big = Image.fromarray(rgba[..., :3]).resize((900, 650))
  np.testing.assert_array_equal(processor(images=[big], return_tensors="np")["pixel_values"],
                                preprocess_images([big], **kw)[0])
