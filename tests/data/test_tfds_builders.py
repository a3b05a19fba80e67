"""TFDS ArrayRecord builders: built splits equal the readers' output, image bytes decode to the same pixels, and
Grain reads them (and the training pipeline runs on them) without TensorFlow."""

import os
import shutil
import sys

import grain
import numpy as np
import pytest

from recall_jax.data import pipeline, tfds_builders
from recall_jax.data.image import ImageBuckets, load_image
from recall_jax.data.readers.circo import read_circo
from recall_jax.data.readers.cirr import read_cirr
from recall_jax.data.readers.fashioniq import read_fashioniq
from recall_jax.data.records import DataError
from recall_jax.data.synthetic import generate_world
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  world = str(tmp_path_factory.mktemp("world"))
  generate_world(world, scale="tiny", seed=0, image_size=56)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for config, layout in (("cirr", "cirr"), ("fashioniq_shirt", "fashioniq"), ("circo", "circo")):
    tfds_builders.build_cir_dataset(os.path.join(world, layout), data_dir, config)
  return world, data_dir


def _read(world, config, split):
  if config == "cirr":
    return read_cirr(os.path.join(world, "cirr"), split)
  if config == "circo":
    return read_circo(os.path.join(world, "circo"), split)
  (result,) = read_fashioniq(os.path.join(world, "fashioniq"), split, categories=("shirt",))
  return result


@pytest.mark.parametrize("config,split", [
    ("cirr", "train"), ("cirr", "val"), ("cirr", "test1"),
    ("fashioniq_shirt", "train"), ("fashioniq_shirt", "val"), ("fashioniq_shirt", "test"),
    ("circo", "val"), ("circo", "test"),
])
def test_built_split_equals_reader(built, config, split):
  world, data_dir = built
  split_read, images = tfds_builders.load_built_split(data_dir, config, split)
  expected = _read(world, config, split)
  assert split_read == expected
  assert len(images) == len(expected.images)
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("config,split", [("cirr", "val"), ("fashioniq_shirt", "train"), ("circo", "test")])
def test_image_bytes_decode_to_the_same_pixels(built, config, split):
  world, data_dir = built
  split_read, images = tfds_builders.load_built_split(data_dir, config, split)
  for name, path in split_read.images.items():
    with open(path, "rb") as f:
      assert images.encoded(name) == f.read()
    np.testing.assert_array_equal(np.asarray(images(name)), np.asarray(load_image(path)))


def test_grain_reads_the_sources_and_the_pipeline_matches_files(built):
  _, data_dir = built
  split, images = tfds_builders.load_built_split(data_dir, "cirr", "train")
  source = tfds_builders.CirQueries(config="cirr", data_dir=data_dir).as_data_source(split="train")
  qids = list(grain.MapDataset.source(source).map(lambda r: r["qid"].decode()))
  assert qids == [q.qid for q in split.queries]

  tokenizer = build_tiny_tokenizer()
  cfg = pipeline.EncodeConfig(image_buckets=ImageBuckets.square(56), query_lengths=(256,), target_lengths=(128,))
  common = dict(dataset="cirr", tokenizer=tokenizer, cfg=cfg, global_batch_size=4, seed=1, num_epochs=1,
                process_index=0, process_count=1)
  from_records = pipeline.train_dataset(split.queries, load=images, **common)
  from_files = pipeline.train_dataset(split.queries, load=pipeline.FileImages(split.images), **common)
  assert len(from_records) == len(from_files) > 0
  for i in range(len(from_files)):
    a, b = from_records[i], from_files[i]
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert "tensorflow" not in sys.modules


def test_skipped_records_are_kept_in_metadata(built, tmp_path):
  world, data_dir = built
  broken = tmp_path / "cirr"
  shutil.copytree(os.path.join(world, "cirr"), broken)
  victim = read_cirr(str(broken), "val").queries[0]
  os.remove(read_cirr(str(broken), "val").images[victim.reference])
  config = tfds_builders.CIRConfig(name="cirr_skip", version=tfds_builders.VERSION, layout="cirr", splits=("val",),
                                   reader_options=(("on_error", "skip"),))
  tfds_builders.build_cir_dataset(str(broken), str(tmp_path / "tfds"), config)
  split_read, _ = tfds_builders.load_built_split(str(tmp_path / "tfds"), config, "val")
  expected = read_cirr(str(broken), "val", on_error="skip")
  assert expected.skipped and split_read.skipped == expected.skipped
  assert split_read == expected


def test_errors_name_the_image_and_record(built):
  _, data_dir = built
  _, images = tfds_builders.load_built_split(data_dir, "cirr", "val")
  with pytest.raises(DataError, match="'no_such_image'.*cir_images/cirr/val"):
    images("no_such_image")
  corrupt = tfds_builders.ImageRecords([{"name": b"a", "image": b"not an image"}], ["a"], "test source")
  with pytest.raises(DataError, match="'a' \\(record 0 of test source\\)"):
    corrupt("a")
  with pytest.raises(DataError, match="split 'train' of 'circo' is not built"):
    tfds_builders.load_built_split(data_dir, "circo", "train")
  with pytest.raises(ValueError, match="array_record only"):
    tfds_builders.CirImages(config="cirr", data_dir=data_dir, file_format="tfrecord")
  with pytest.raises(ValueError, match="a category is required for fashioniq"):
    tfds_builders.CIRConfig(name="bad", layout="fashioniq")


def test_dataset_configs_name_their_reader_options():
  assert tfds_builders.dataset_configs("cirr") == [c for c in tfds_builders.CirImages.BUILDER_CONFIGS if c.name == "cirr"]
  dress, shirt = tfds_builders.dataset_configs("fashioniq", ("dress", "shirt"), image_ext=".jpg", on_error="skip")
  assert (dress.name, shirt.name) == ("fashioniq_dress_jpg_skip", "fashioniq_shirt_jpg_skip")
  assert dress.category == "dress" and dict(dress.reader_options) == {"image_ext": ".jpg", "on_error": "skip"}
  with pytest.raises(ValueError, match="no FashionIQ category 'hat'"):
    tfds_builders.dataset_configs("fashioniq", ("hat",))
