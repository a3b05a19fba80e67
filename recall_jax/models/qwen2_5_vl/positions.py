"""Position ids for the Qwen2.5-VL language model, computed on the host in numpy; Qwen3-VL's get_rope_index gives
the same positions for images (it differs only for videos' timestamps), so both families use these functions.

`get_rope_index` follows transformers' Qwen2_5_VLModel.get_rope_index (5.23) for images: text tokens count up by
one; an image's tokens get (t, h, w) = start + (frame, row, column) over its merged grid; the text after an image
continues at start + max(grid_h, grid_w) / merge. Padding positions (attention_mask == 0) are left out of the count
and set to 0. `sequential_position_ids` gives plain 1-D positions (what HF generation uses for text models).
"""

from __future__ import annotations

import numpy as np

from recall_jax.models.qwen2_5_vl.config import Qwen25VLConfig


def _runs(flags: np.ndarray) -> list[tuple[bool, int, int]]:
  """Maximal runs of equal values in a 1-D bool array as (value, start, end)."""
  if flags.size == 0:
    return []
  edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
  starts = np.concatenate([[0], edges])
  ends = np.concatenate([edges, [flags.size]])
  return [(bool(flags[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def _image_positions(start: int, grid_thw: np.ndarray, merge: int) -> np.ndarray:
  t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
  tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
  return np.stack([tt, hh, ww]).reshape(3, -1) + start


def get_rope_index(input_ids: np.ndarray, image_grid_thw: np.ndarray | None, attention_mask: np.ndarray | None,
                   cfg: Qwen25VLConfig) -> tuple[np.ndarray, np.ndarray]:
  """3-D M-RoPE positions (3, B, L) int32 and rope deltas (B, 1) int32 (max position + 1 - valid length).

  Images are consumed from `image_grid_thw` in order over the batch (row-major), as the HF processor lays them out;
  a run of image tokens may hold several adjacent images. Raises ValueError when the image tokens do not match
  the grids.
  """
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
  batch, length = input_ids.shape
  mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  if mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
  grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
  merge = cfg.vision.spatial_merge_size
  tokens_per_image = (grids.prod(-1) // merge**2).astype(np.int64)
  next_image = 0
  position_ids = np.zeros((3, batch, length), np.int32)
  deltas = np.zeros((batch, 1), np.int32)
  for b in range(batch):
    ids = input_ids[b][mask[b]]
    pieces, pos = [], 0
    for is_image, start, end in _runs(ids == cfg.image_token_id):
      if not is_image:
        pieces.append(np.broadcast_to(np.arange(end - start) + pos, (3, end - start)))
        pos += end - start
        continue
      remaining = end - start
      while remaining > 0:
        if next_image >= len(grids):
          raise ValueError(f"row {b}: more image tokens than image_grid_thw provides ({len(grids)} images)")
        n = int(tokens_per_image[next_image])
        if n > remaining:
          raise ValueError(f"row {b}: image {next_image} needs {n} image tokens but its run has only {remaining}")
        grid = grids[next_image]
        pieces.append(_image_positions(pos, grid, merge))
        pos += max(int(grid[1]), int(grid[2])) // merge
        remaining -= n
        next_image += 1
    if pieces:
      row = np.concatenate(pieces, axis=1)
      position_ids[:, b, mask[b]] = row
      deltas[b, 0] = row.max() + 1 - ids.size
  if next_image != len(grids):
    raise ValueError(f"image_grid_thw has {len(grids)} images but the input_ids hold tokens for {next_image}")
  return position_ids, deltas


def sequential_position_ids(attention_mask: np.ndarray) -> np.ndarray:
  """1-D positions (B, L) int32 counting valid tokens from 0; padding gets 1 (as HF generation does)."""
  mask = np.asarray(attention_mask).astype(bool)
  positions = np.cumsum(mask, axis=-1) - 1
  return np.where(mask, positions, 1).astype(np.int32)


def position_ids_for(cfg: Qwen25VLConfig, input_ids: np.ndarray, attention_mask: np.ndarray,
                     image_grid_thw: np.ndarray | None) -> np.ndarray:
  """The (3, B, L) int32 position ids the language model uses under `cfg.position_mode`."""
  if cfg.position_mode == "mrope":
    return get_rope_index(input_ids, image_grid_thw, attention_mask, cfg)[0]
  if cfg.position_mode == "sequential":
    return np.broadcast_to(sequential_position_ids(attention_mask), (3, *np.shape(input_ids))).copy()
  raise ValueError(f"config position_mode must be 'mrope' or 'sequential', got {cfg.position_mode!r}")
