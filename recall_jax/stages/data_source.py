"""Where the stages' splits and their pixels come from, by config data.format.

"files":        the dataset in its published layout (data.root, or the synthetic world of the prepare stage), one
                image file per image;
"array_record": the same dataset as ArrayRecord files (`paths.array_record_dir`: data.array_record_dir, e.g. a
                bucket, or the one the prepare stage writes), the queries and each image's encoded file bytes.

Every stage gets its splits from `read_splits` and its images from `image_loader`, so none chooses a format. The
records hold the files' bytes unchanged (recall_jax/data/tfds_builders.py), so both formats decode to the same
arrays and give the same results (tests/stages/test_data_format.py).
"""

from __future__ import annotations

import os
from typing import Sequence

from ml_collections import ConfigDict

from recall_jax import files
from recall_jax.data import pipeline, readers
from recall_jax.data.records import CIRSplit, DataError
from recall_jax.stages import paths

FORMATS = ("files", "array_record")


def _builders():
  # Imported on use: TensorFlow Datasets takes seconds to import, which a run reading files does not need.
  from recall_jax.data import tfds_builders
  return tfds_builders


def data_format(cfg: ConfigDict) -> str:
  value = cfg.data.get("format", "files")
  if value not in FORMATS:
    raise ValueError(f"config data.format must be one of {list(FORMATS)}, got {value!r}")
  return value


def dataset_root(cfg: ConfigDict, workdir: str) -> str:
  """The configured dataset in its published layout: data.root, or its layout in the synthetic world."""
  world = paths.world_root(cfg, workdir)  # validates data.root
  return cfg.data.root or os.path.join(world, cfg.data.dataset)


def builder_configs(cfg: ConfigDict) -> list:
  """The TFDS configs holding the configured dataset (FashionIQ: one per data.categories), read with its options."""
  d = cfg.data
  return _builders().dataset_configs(d.dataset, tuple(d.categories), d.image_ext, d.on_error)


def build_command(cfg: ConfigDict, workdir: str) -> str:
  d = cfg.data
  root = "<dataset root>" if d.root is None else dataset_root(cfg, workdir)
  extra = (f" --categories {','.join(d.categories)} --image_ext {d.image_ext}" if d.dataset == "fashioniq" else "")
  extra += f" --on_error {d.on_error}" if d.on_error != "raise" else ""
  return (f"python -m recall_jax.data.tfds_builders --dataset {d.dataset} --root {root}"
          f" --out {paths.array_record_dir(cfg, workdir)}{extra}")


def require_built(cfg: ConfigDict, workdir: str) -> None:
  """With data.format "array_record", raises naming the path when the ArrayRecord dataset lacks a config, a split
  or a file; nothing with "files"."""
  if data_format(cfg) != "array_record":
    return
  where = paths.array_record_dir(cfg, workdir)
  problems = [p for c in builder_configs(cfg) for p in _builders().built_problems(where, c)]
  if problems:
    raise FileNotFoundError(
        f"config data.format = 'array_record': the ArrayRecord dataset at {where} (data.array_record_dir) is "
        f"missing or incomplete:\n  " + "\n  ".join(problems[:10]) +
        f"\nA prepare stage that runs with this format writes it; so does this command:\n  "
        f"{build_command(cfg, workdir)}")


def read_splits(cfg: ConfigDict, workdir: str, split: str) -> list[CIRSplit]:
  """The configured dataset's splits (FashionIQ: one per category), as the readers return them."""
  d = cfg.data
  if data_format(cfg) == "array_record":
    where = paths.array_record_dir(cfg, workdir)
    return [_builders().load_built_split(where, c, split)[0] for c in builder_configs(cfg)]
  root = dataset_root(cfg, workdir)
  if d.dataset == "fashioniq":
    return readers.read_fashioniq(root, split, categories=tuple(d.categories), image_ext=d.image_ext,
                                  on_error=d.on_error)
  if d.dataset == "cirr":
    return [readers.read_cirr(root, split, on_error=d.on_error)]
  if d.dataset == "circo":
    return [readers.read_circo(root, split, on_error=d.on_error)]
  raise ValueError(f"config data.dataset must be fashioniq, cirr or circo, got {d.dataset!r}")


class MergedRecords:
  """Image name -> PIL RGB image from the first of several splits' ImageRecords that holds it: their images merged,
  as `FileImages` merges the splits' paths. Picklable, like ImageRecords, for Grain worker processes."""

  def __init__(self, records: Sequence):
    self.records = list(records)

  def __call__(self, name: str):
    for records in self.records:
      if name in records:
        return records(name)
    raise DataError(f"image {name!r} is in none of {[r.where for r in self.records]}")


def image_loader(cfg: ConfigDict, workdir: str, splits: Sequence[CIRSplit]) -> pipeline.ImageLoader:
  """Image name -> PIL RGB image over the images of `splits` (from `read_splits`), in the configured format."""
  if data_format(cfg) == "files":
    merged: dict[str, str] = {}
    for split in splits:
      merged.update(split.images)
    return pipeline.FileImages(merged)
  where = paths.array_record_dir(cfg, workdir)
  configs = {(c.layout, c.category): c for c in builder_configs(cfg)}
  records = []
  for split in splits:
    config = configs.get((split.dataset, split.category))
    if config is None:
      raise ValueError(f"split {split.dataset}/{split.split}/{split.category} is not part of config data.dataset = "
                       f"{cfg.data.dataset!r} (categories {list(cfg.data.categories)}): no ArrayRecord config holds it")
    records.append(_builders().load_built_images(where, config, split.split))
  return records[0] if len(records) == 1 else MergedRecords(records)


def write_array_record(cfg: ConfigDict, workdir: str) -> dict:
  """The prepare stage's part with data.format "array_record": builds every config of the configured dataset from
  its published layout (`dataset_root`) into `paths.array_record_dir` (parts already built are kept), then checks
  the result; returns the manifest entry."""
  where = paths.array_record_dir(cfg, workdir)
  if not cfg.data.root and not cfg.data.get("array_record_dir") and files.exists(where):
    files.rmtree(where)  # prepare's own copy of a synthetic world that an interrupted run generated again
  root = dataset_root(cfg, workdir)
  for config in builder_configs(cfg):
    _builders().build_cir_dataset(root, where, config)
  require_built(cfg, workdir)
  return {"dir": where, "root": root, "configs": [c.name for c in builder_configs(cfg)]}
