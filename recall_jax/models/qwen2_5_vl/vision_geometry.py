"""Host-side (numpy) geometry of the Qwen2.5-VL vision tower for a set of image grids.

Everything in the vision forward that depends on the image grids is computed here, so the jitted tower sees
only arrays whose shapes are fixed by the grid set. The tower keeps tokens in the processor's order (merge
blocks of merge**2 consecutive patches); window and full attention gather tokens into padded batches whose
rows are in exactly the order transformers' window-permuted sequence has them (so attention sums run in the
same order), and each token is read back from its padded slot by a flat index. This replaces transformers'
permute -> blocks -> argsort(window_index) round trip with the same math.

Conventions follow transformers' `vision_utils.get_vision_position_ids`, `get_vision_window_index` and
`get_vision_cu_seqlens` (one attention segment per frame for full attention; windows never cross frames).
"""

from __future__ import annotations

import functools

import numpy as np

from recall_jax.models.qwen2_5_vl.config import VisionConfig


def _check_grids(image_grid_thw: np.ndarray, cfg: VisionConfig) -> np.ndarray:
  grids = np.asarray(image_grid_thw)
  if grids.ndim != 2 or grids.shape[1] != 3 or grids.shape[0] == 0:
    raise ValueError(f"image_grid_thw: expected shape (num_images, 3) with at least one row, got {grids.shape}")
  if not np.issubdtype(grids.dtype, np.integer):
    raise ValueError(f"image_grid_thw: expected integers, got dtype {grids.dtype}")
  m = cfg.spatial_merge_size
  for i, (t, h, w) in enumerate(grids.tolist()):
    if t < 1 or h < 1 or w < 1 or h % m or w % m:
      raise ValueError(f"image_grid_thw[{i}] = {(t, h, w)}: t, h, w must be positive and h, w multiples of "
                       f"vision spatial_merge_size {m}")
  return grids.astype(np.int64)


def rotary_position_ids(image_grid_thw: np.ndarray, cfg: VisionConfig) -> np.ndarray:
  """(num_patches, 2) int32 (h, w) patch coordinates in processor order, as transformers' `rot_pos_emb` uses."""
  grids = _check_grids(image_grid_thw, cfg)
  m = cfg.spatial_merge_size
  out = []
  for t, h, w in grids.tolist():
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // m, m, w // m, m)
    hpos = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
  return np.concatenate(out, axis=0).astype(np.int32)


def window_index(image_grid_thw: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
  """transformers' `get_vision_window_index`: the merged-unit permutation into windows and window boundaries.

  Returns (window_index (num_merged,) int64, cu_window_seqlens (num_windows + 1,) int32 in patch units),
  empty windows dropped (transformers' `unique_consecutive`).
  """
  grids = _check_grids(image_grid_thw, cfg)
  m = cfg.spatial_merge_size
  side = cfg.window_size // m // cfg.patch_size  # window side in merged units
  if side < 1:
    raise ValueError(f"vision window_size {cfg.window_size} is smaller than one merged unit "
                     f"({m} x patch_size {cfg.patch_size})")
  unit = m * m
  index_parts, lengths = [], []
  offset = 0
  for t, h, w in grids.tolist():
    lh, lw = h // m, w // m
    nwh, nww = -(-lh // side), -(-lw // side)
    index = np.full((t, nwh * side, nww * side), -1, dtype=np.int64)
    index[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
    index = index.reshape(t, nwh, side, nww, side).transpose(0, 1, 3, 2, 4).reshape(t * nwh * nww, side * side)
    for row in index:
      valid = row[row >= 0]
      if valid.size:
        index_parts.append(valid + offset)
        lengths.append(valid.size * unit)
    offset += t * lh * lw
  cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
  return np.concatenate(index_parts), cu


def _padded_segments(order: np.ndarray, cu: np.ndarray) -> dict[str, np.ndarray]:
  """Packs the contiguous segments order[cu[i]:cu[i+1]] into a padded (num_segments, max_len) gather table.

  `scatter[token]` is the flat slot (segment * max_len + position) holding that token, so reading the
  flattened attention output at `scatter` restores token order. Padded slots gather token 0 and are masked
  out as keys by `lengths` (they sit after the valid prefix).
  """
  lengths = np.diff(cu).astype(np.int32)
  num, max_len = lengths.size, int(lengths.max())
  gather = np.zeros((num, max_len), dtype=np.int32)
  scatter = np.empty(order.size, dtype=np.int32)
  for i, (start, n) in enumerate(zip(cu[:-1].tolist(), lengths.tolist())):
    tokens = order[start:start + n]
    gather[i, :n] = tokens
    scatter[tokens] = i * max_len + np.arange(n)
  return {"gather": gather, "lengths": lengths, "scatter": scatter}


def vision_geometry(image_grid_thw: np.ndarray, cfg: VisionConfig) -> dict[str, np.ndarray]:
  """Everything data-dependent the vision tower needs for these grids (numpy, host side).

  Keys (N = sum t*h*w patches):
    rotary_pos (N, 2) int32: (h, w) coordinates per patch, processor order.
    window_gather (num_windows, max_window_len) int32, window_lengths (num_windows,) int32,
    window_scatter (N,) int32: padded windows for the windowed-attention blocks.
    full_gather (num_frames, max_frame_len) int32, full_lengths, full_scatter: the same for the
    full-attention blocks (one segment per image frame).
  Shapes depend only on the grid set, so the jitted tower compiles once per set of shapes.
  """
  grids = _check_grids(image_grid_thw, cfg)
  unit = cfg.spatial_merge_size**2
  num_patches = int(np.sum(np.prod(grids, axis=-1)))
  merged_order, cu_window = window_index(grids, cfg)
  # Token order of transformers' window-permuted sequence: each merged unit's `unit` patches stay together.
  token_order = (merged_order[:, None] * unit + np.arange(unit)).reshape(-1).astype(np.int32)
  frame_lengths = np.repeat(grids[:, 1] * grids[:, 2], grids[:, 0])
  cu_full = np.concatenate([[0], np.cumsum(frame_lengths)]).astype(np.int32)
  assert token_order.size == num_patches == cu_full[-1] == cu_window[-1]
  windows = _padded_segments(token_order, cu_window)
  full = _padded_segments(token_order, cu_full)
  geometry = {"rotary_pos": rotary_position_ids(grids, cfg)}
  geometry.update({f"window_{k}": v for k, v in windows.items()})
  geometry.update({f"full_{k}": v for k, v in full.items()})
  return geometry


@functools.lru_cache(maxsize=32)
def batch_geometry(vision_cfg: VisionConfig, grid: tuple[int, int, int], images: int) -> dict[str, np.ndarray]:
  """Vision geometry of `images` images of one grid (host numpy, cached: one per bucket and call size)."""
  return vision_geometry(np.asarray([grid] * images, np.int64), vision_cfg)
