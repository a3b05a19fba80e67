"""Host-side position ids against transformers' get_rope_index and HF generation's 1-D positions."""

import numpy as np
import pytest
import torch

from recall_jax.models.qwen2_5_vl import positions, tiny_config
from tests.models.qwen2_5_vl import reference as ref

CFG = tiny_config()


@pytest.fixture(scope="module")
def hf_model():
  cfg = tiny_config(text=dict(num_hidden_layers=1), vision=dict(depth=1, fullatt_block_indexes=()))
  return ref.build_reference(cfg)


@pytest.mark.parametrize("rows", [
    [[5, (1, 8, 12), 3, (1, 10, 6), 4], [3, (1, 12, 8), 2]],  # two images in a row, left padding
    [[(1, 4, 4), 7], [2, (1, 6, 10), (1, 4, 4), 1], [9]],  # image first, back-to-back images, text-only row
    [[4, (2, 8, 8), 3], [1, (1, 2, 2)]],  # a two-frame grid, a single merged token
    [[6], [3]],  # text only
])
def test_get_rope_index_matches_transformers(hf_model, rows):
  batch = ref.make_batch(CFG, rows, seed=len(rows))
  ids, mask = batch["input_ids"], batch["attention_mask"]
  grid = batch.get("image_grid_thw")
  got, deltas = positions.get_rope_index(ids, grid, mask, CFG)
  want = ref.reference_position_ids(hf_model, batch).numpy()
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.int32 and got.shape == (3, *ids.shape)
  # rope_deltas: next free position minus the number of valid tokens, per row.
  for b in range(ids.shape[0]):
    row = want[:, b, mask[b].astype(bool)]
    assert deltas[b, 0] == row.max() + 1 - row.shape[1]


def test_sequential_positions_match_hf_generation():
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
  want = (torch.from_numpy(mask).cumsum(-1) - 1).masked_fill(torch.from_numpy(mask) == 0, 1).numpy()
  np.testing.assert_array_equal(positions.sequential_position_ids(mask), want)
  ids = np.full(mask.shape, 7)
  seq = positions.position_ids_for(CFG.replace(position_mode="sequential"), ids, mask, None)
  assert seq.shape == (3, *mask.shape)
  np.testing.assert_array_equal(seq, np.broadcast_to(want, seq.shape))


def test_mismatched_images_are_errors():
  batch = ref.make_batch(CFG, [[3, (1, 4, 4), 2]])
  ids, mask = batch["input_ids"], batch["attention_mask"]
  with pytest.raises(ValueError, match="image_grid_thw has 2 images"):
    positions.get_rope_index(ids, np.array([[1, 4, 4], [1, 4, 4]]), mask, CFG)
  with pytest.raises(ValueError, match="more image tokens than image_grid_thw"):
    positions.get_rope_index(ids, None, mask, CFG)
  with pytest.raises(ValueError, match="needs 16 image tokens but its run has only 4"):
    positions.get_rope_index(ids, np.array([[1, 8, 8]]), mask, CFG)
  with pytest.raises(ValueError, match="position_mode"):
    positions.position_ids_for(CFG.replace(position_mode="2d"), ids, mask, None)
