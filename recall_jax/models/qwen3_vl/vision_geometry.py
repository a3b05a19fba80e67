"""Host-side (numpy) geometry of the Qwen3-VL vision tower for a set of image grids.

Everything grid-dependent in the tower's forward, so the jitted tower sees arrays whose shapes the grid set fixes:
  rotary_pos (N, 2) int32     (h, w) patch coordinates in processor order (merge blocks first), as Qwen2.5-VL;
  pos_index (N, 4) int32,     the bilinear (align_corners=True, border) taps into the square learned position table
  pos_weight (N, 4) float32   and their weights: transformers' `get_vision_interpolation_indices_and_weights`;
  full_gather / full_lengths / full_scatter: every block attends within one image frame (no windows), packed into
                              padded rows exactly like Qwen2.5-VL's full-attention blocks.
"""

from __future__ import annotations

import functools

import numpy as np

from recall_jax.models.qwen2_5_vl.vision_geometry import _check_grids, _padded_segments, rotary_position_ids
from recall_jax.models.qwen3_vl.config import VisionConfig

GEOMETRY_KEYS = ("rotary_pos", "pos_index", "pos_weight", "full_gather", "full_lengths", "full_scatter")


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear taps (floor, floor + 1, clamped to the table) and weights along one axis, align_corners=True."""
  src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
  floor = np.floor(src)
  offsets = np.arange(2)
  taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
  weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None).astype(np.float32)
  return taps, weights


def position_taps(image_grid_thw: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
  """(N, 4) int32 table indices and (N, 4) float32 weights: the learned (side x side) position grid resampled to
  each image's (h, w) patch grid, per patch in processor order (repeated over frames)."""
  grids = _check_grids(image_grid_thw, cfg)
  side, m = cfg.num_grid_per_side, cfg.spatial_merge_size
  if side * side != cfg.num_position_embeddings:
    raise ValueError(f"vision num_position_embeddings {cfg.num_position_embeddings} is not a square")
  indices, weights = [], []
  for t, h, w in grids.tolist():
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // m, m, w // m, m)
    rows = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    cols = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    h_taps, h_weights = _axis_taps(rows, h, side)
    w_taps, w_weights = _axis_taps(cols, w, side)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weight = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    indices.append(np.tile(index, (t, 1)))
    weights.append(np.tile(weight, (t, 1)))
  return np.concatenate(indices).astype(np.int32), np.concatenate(weights).astype(np.float32)


def vision_geometry(image_grid_thw: np.ndarray, cfg: VisionConfig) -> dict[str, np.ndarray]:
  """Everything data-dependent the Qwen3-VL vision tower needs for these grids (numpy; keys: GEOMETRY_KEYS)."""
  grids = _check_grids(image_grid_thw, cfg)
  num_patches = int(np.sum(np.prod(grids, axis=-1)))
  frame_lengths = np.repeat(grids[:, 1] * grids[:, 2], grids[:, 0])
  cu_full = np.concatenate([[0], np.cumsum(frame_lengths)]).astype(np.int32)
  full = _padded_segments(np.arange(num_patches, dtype=np.int32), cu_full)
  pos_index, pos_weight = position_taps(grids, cfg)
  geometry = {"rotary_pos": rotary_position_ids(grids, cfg), "pos_index": pos_index, "pos_weight": pos_weight}
  geometry.update({f"full_{k}": v for k, v in full.items()})
  return geometry


@functools.lru_cache(maxsize=32)
def batch_geometry(vision_cfg: VisionConfig, grid: tuple[int, int, int], images: int) -> dict[str, np.ndarray]:
  """Vision geometry of `images` images of one grid (host numpy, cached: one per bucket and call size)."""
  return vision_geometry(np.asarray([grid] * images, np.int64), vision_cfg)
