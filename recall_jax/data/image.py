"""Image loading, Qwen2-VL smart resize and patchify (numpy + PIL), and image-size buckets for static shapes.

`preprocess_images` reproduces transformers' `Qwen2VLImageProcessorPil` bit for bit: RGB conversion (alpha
composited on white), PIL bicubic resize to the smart-resized size, rescale by 1/255 (in float64, then float32),
per-channel normalisation in float32, duplication of the single frame over the temporal patch, and the processor's
patch order (merge windows first) flattened to (grid_t * grid_h * grid_w, C * T * P * P).
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from recall_jax import files
from recall_jax.data.records import DataError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MIN_PIXELS = 56 * 56
MAX_PIXELS = 384 * 384
RESAMPLE = Image.Resampling.BICUBIC

ImageLike = Union[Image.Image, np.ndarray]


def load_image(path: str) -> Image.Image:
  """Reads and fully decodes an image file as RGB; a missing or unreadable file raises DataError naming it."""
  try:
    with files.path(path).open("rb") as f, Image.open(f) as image:  # local, or in a bucket
      image.load()
      return to_rgb(image)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e


def to_rgb(image: ImageLike) -> Image.Image:
  """RGB PIL image; transparency is composited on white, as transformers' `convert_to_rgb` does."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise ValueError(f"array images must be uint8 (H, W) or (H, W, C), got {image.dtype} {image.shape}")
    image = Image.fromarray(image)
  if not isinstance(image, Image.Image):
    raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
  """Qwen2-VL's target size: multiples of `factor`, area in [min_pixels, max_pixels], aspect ratio kept."""
  if max(height, width) / min(height, width) > 200:
    raise ValueError(
        f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def _patchify(image: np.ndarray, patch_size: int, temporal_patch_size: int,
              merge_size: int) -> tuple[np.ndarray, int, int]:
  """(C, H, W) float32 -> (grid_h * grid_w, C * T * P * P) in the processor's merge-window order."""
  channels, height, width = image.shape
  grid_h, grid_w = height // patch_size, width // patch_size
  patches = image.reshape(channels, grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size,
                          patch_size)
  patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
  # A still image is one temporal patch: the frame repeated temporal_patch_size times.
  patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], temporal_patch_size,
                                                           *patches.shape[5:]))
  flat = patches.reshape(grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
  return flat, grid_h, grid_w


def preprocess_images(
    images: Sequence[ImageLike],
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
) -> tuple[np.ndarray, np.ndarray]:
  """Images -> (pixel_values float32 (N, C*T*P*P), image_grid_thw int64 (n_images, 3)), as the HF processor."""
  if not images:
    raise ValueError("preprocess_images needs at least one image")
  mean = np.asarray(image_mean, np.float32)[:, None, None]
  std = np.asarray(image_std, np.float32)[:, None, None]
  factor = patch_size * merge_size
  all_patches, grids = [], []
  for image in images:
    image = to_rgb(image)
    height, width = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    resized = np.asarray(image.resize((width, height), resample=RESAMPLE)).transpose(2, 0, 1)
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalized = (scaled - mean) / std
    patches, grid_h, grid_w = _patchify(normalized, patch_size, temporal_patch_size, merge_size)
    all_patches.append(patches)
    grids.append((1, grid_h, grid_w))
  return np.concatenate(all_patches, axis=0), np.asarray(grids, np.int64)


class ImageBuckets:
  """A few fixed (height, width) sizes, multiples of `factor`, so jitted code sees a small set of static grids.

  An image goes to the bucket of nearest aspect ratio (distance of log(h / w); ties go to the first bucket) and is
  resized to exactly that size; `preprocess_images` then keeps the size, so its grid is (1, h / 14, w / 14).
  """

  def __init__(self, sizes: Sequence[Sequence[int]], *, factor: int = 28, min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS):
    if not sizes:
      raise ValueError("ImageBuckets needs at least one (height, width) size")
    checked = []
    for size in sizes:
      if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ValueError(f"image bucket {size!r} must be a (height, width) pair of positive ints")
      height, width = int(size[0]), int(size[1])
      if height % factor or width % factor:
        raise ValueError(f"image bucket {(height, width)} is not a multiple of {factor} in both sides")
      if not min_pixels <= height * width <= max_pixels:
        raise ValueError(f"image bucket {(height, width)} has {height * width} pixels, outside "
                         f"[min_pixels={min_pixels}, max_pixels={max_pixels}]")
      checked.append((height, width))
    self.sizes: tuple[tuple[int, int], ...] = tuple(checked)
    self.factor = factor
    self._log_ratios = np.log([h / w for h, w in self.sizes])

  @classmethod
  def square(cls, size: int, **kwargs: Any) -> "ImageBuckets":
    return cls([(size, size)], **kwargs)

  @classmethod
  def from_config(cls, spec: Any, **kwargs: Any) -> "ImageBuckets":
    """From a config value: an int (one square bucket) or a list of (height, width) pairs."""
    if isinstance(spec, (int, np.integer)):
      return cls.square(int(spec), **kwargs)
    if isinstance(spec, (list, tuple)):
      return cls([tuple(s) for s in spec], **kwargs)
    raise ValueError(f"image buckets config must be an int or a list of (height, width) pairs, got {spec!r}")

  def choose(self, height: int, width: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to height / width (first one on ties)."""
    distance = np.abs(self._log_ratios - math.log(height / width))
    return self.sizes[int(np.argmin(distance))]

  def resize(self, image: ImageLike) -> Image.Image:
    """RGB image resized to its bucket with the processor's resample filter."""
    image = to_rgb(image)
    height, width = self.choose(image.height, image.width)
    return image.resize((width, height), resample=RESAMPLE)

  def grid(self, size: tuple[int, int], patch_size: int = 14) -> tuple[int, int, int]:
    """The image_grid_thw row that `preprocess_images` gives for an image of bucket `size`."""
    return (1, size[0] // patch_size, size[1] // patch_size)
