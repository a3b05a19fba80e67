"""Image loading, smart resize, preprocessing parity with transformers' Qwen2VLImageProcessorPil, and buckets."""

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from recall_jax.data import image as image_lib
from recall_jax.data.records import DataError

MIN_PIXELS, MAX_PIXELS = 3136, 147456


def _random_image(height, width, mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  channels = {"RGB": (3,), "RGBA": (4,), "L": ()}[mode]
  return Image.fromarray(rng.integers(0, 256, (height, width, *channels), dtype=np.uint8), mode)


def _reference(images, **kwargs):
  processor = Qwen2VLImageProcessorPil(min_pixels=kwargs.pop("min_pixels", MIN_PIXELS),
                                       max_pixels=kwargs.pop("max_pixels", MAX_PIXELS), **kwargs)
  out = processor(images)
  return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def test_clip_constants_match_transformers():
  assert image_lib.OPENAI_CLIP_MEAN == tuple(OPENAI_CLIP_MEAN)
  assert image_lib.OPENAI_CLIP_STD == tuple(OPENAI_CLIP_STD)


@pytest.mark.parametrize("height,width", [(1, 1), (20, 20), (28, 28), (100, 60), (30, 500), (500, 30), (900, 700),
                                          (384, 384), (385, 385), (3, 590), (13, 2600), (4000, 30)])
def test_smart_resize_matches_transformers(height, width):
  for min_pixels, max_pixels in [(MIN_PIXELS, MAX_PIXELS), (56 * 56, 28 * 28 * 1280)]:
    got = image_lib.smart_resize(height, width, 28, min_pixels, max_pixels)
    assert got == hf_smart_resize(height, width, 28, min_pixels, max_pixels)
    assert got[0] % 28 == 0 and got[1] % 28 == 0


def test_smart_resize_rejects_extreme_aspect_ratio():
  with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
    image_lib.smart_resize(10, 2010)
  with pytest.raises(ValueError):
    hf_smart_resize(10, 2010)


@pytest.mark.parametrize("seed,size,mode", [
    (10, (200, 60), "RGB"),  # tall
    (11, (30, 500), "RGB"),  # wide
    (12, (20, 20), "RGB"),  # tiny: upsampled to min_pixels
    (13, (900, 700), "RGB"),  # large: downsampled to max_pixels
    (14, (50, 80), "RGBA"),  # transparency composited on white
    (15, (64, 90), "L"),  # greyscale
])
def test_preprocess_matches_hf_processor(seed, size, mode):
  image = _random_image(*size, mode=mode, seed=seed)
  pixel_values, grid = image_lib.preprocess_images([image])
  ref_values, ref_grid = _reference([image])
  assert pixel_values.dtype == np.float32 and grid.dtype == np.int64
  assert pixel_values.shape == ref_values.shape and pixel_values.shape[1] == 1176
  np.testing.assert_array_equal(grid, ref_grid)
  np.testing.assert_allclose(pixel_values, ref_values, rtol=0, atol=1e-6)
  height, width = image_lib.smart_resize(*size)
  assert tuple(grid[0]) == (1, height // 14, width // 14)


def test_preprocess_batch_concatenates_in_order():
  images = [_random_image(100, 60, seed=1), _random_image(900, 700, seed=2), _random_image(20, 20, seed=3)]
  pixel_values, grid = image_lib.preprocess_images(images)
  ref_values, ref_grid = _reference(images)
  np.testing.assert_array_equal(grid, ref_grid)
  np.testing.assert_allclose(pixel_values, ref_values, rtol=0, atol=1e-6)
  assert pixel_values.shape[0] == int(grid.prod(axis=1).sum())


def test_preprocess_custom_pixel_limits_and_arrays():
  array = np.asarray(_random_image(300, 200, seed=4))
  pixel_values, grid = image_lib.preprocess_images([array], min_pixels=28 * 28, max_pixels=112 * 112)
  ref_values, ref_grid = _reference([Image.fromarray(array)], min_pixels=28 * 28, max_pixels=112 * 112)
  np.testing.assert_array_equal(grid, ref_grid)
  np.testing.assert_allclose(pixel_values, ref_values, rtol=0, atol=1e-6)


def test_temporal_frames_are_duplicated():
  pixel_values, _ = image_lib.preprocess_images([_random_image(56, 56, seed=5)])
  patches = pixel_values.reshape(-1, 3, 2, 14, 14)
  np.testing.assert_array_equal(patches[:, :, 0], patches[:, :, 1])


def test_load_image_reads_rgb(tmp_path):
  path = tmp_path / "img.png"
  _random_image(40, 30, mode="RGBA", seed=6).save(path)
  loaded = image_lib.load_image(str(path))
  assert loaded.mode == "RGB" and loaded.size == (30, 40)
  np.testing.assert_array_equal(image_lib.preprocess_images([loaded])[0],
                                _reference([Image.open(path)])[0])


def test_load_image_missing_file_names_path(tmp_path):
  path = str(tmp_path / "missing.jpg")
  with pytest.raises(DataError, match="missing.jpg"):
    image_lib.load_image(path)


def test_load_image_corrupt_file_names_path(tmp_path):
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"not an image at all")
  with pytest.raises(DataError, match="garbage.png"):
    image_lib.load_image(str(garbage))
  truncated = tmp_path / "truncated.jpg"
  _random_image(64, 64, seed=7).save(tmp_path / "full.jpg")
  truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
  with pytest.raises(DataError, match="truncated.jpg"):
    image_lib.load_image(str(truncated))


def test_buckets_choose_nearest_aspect_ratio():
  buckets = image_lib.ImageBuckets([(336, 336), (224, 448), (448, 224)])
  assert buckets.choose(500, 480) == (336, 336)
  assert buckets.choose(100, 300) == (224, 448)
  assert buckets.choose(300, 90) == (448, 224)
  # Equal log-distance from the two non-square buckets: the first listed wins.
  tie = image_lib.ImageBuckets([(224, 448), (448, 224)])
  assert tie.choose(100, 100) == (224, 448)
  assert image_lib.ImageBuckets([(448, 224), (224, 448)]).choose(100, 100) == (448, 224)


@pytest.mark.parametrize("size", [(17, 23), (640, 480), (60, 400), (1000, 90)])
def test_bucket_resize_gives_bucket_grid(size):
  buckets = image_lib.ImageBuckets([(336, 336), (224, 448), (448, 224), (112, 672)])
  image = _random_image(*size, seed=8)
  resized = buckets.resize(image)
  bucket = buckets.choose(*size)
  assert (resized.height, resized.width) == bucket
  _, grid = image_lib.preprocess_images([resized])
  assert tuple(grid[0]) == buckets.grid(bucket) == (1, bucket[0] // 14, bucket[1] // 14)
  ref_values, ref_grid = _reference([resized])
  np.testing.assert_array_equal(grid, ref_grid)
  np.testing.assert_allclose(image_lib.preprocess_images([resized])[0], ref_values, rtol=0, atol=1e-6)


def test_bucket_constructors_and_errors():
  assert image_lib.ImageBuckets.square(224).sizes == ((224, 224),)
  assert image_lib.ImageBuckets.from_config(336).sizes == ((336, 336),)
  assert image_lib.ImageBuckets.from_config([[224, 448], (448, 224)]).sizes == ((224, 448), (448, 224))
  with pytest.raises(ValueError, match="multiple of 28"):
    image_lib.ImageBuckets([(224, 230)])
  with pytest.raises(ValueError, match="outside"):
    image_lib.ImageBuckets.square(28)  # 784 < min_pixels
  with pytest.raises(ValueError, match="outside"):
    image_lib.ImageBuckets.square(392)  # 153664 > max_pixels
  with pytest.raises(ValueError, match="at least one"):
    image_lib.ImageBuckets([])
  with pytest.raises(ValueError, match="int or a list"):
    image_lib.ImageBuckets.from_config("224")
