"""TFDS builders that turn a local CIR dataset into ArrayRecord files, and their reader for Grain; no TensorFlow.

Two builders share one set of configs (one per file layout, FashionIQ one per category):

  cir_queries/<config>  one record per query of a split (the fields of `records.Query`, in file order);
  cir_images/<config>   one record per image a split may touch: its name, the ENCODED file bytes as read from disk
                        (never re-encoded, so they decode to the same pixels), its gallery position and source path.

`manual_dir` is a local copy of the dataset in its real layout (or the synthetic world written in it); the
records come from the readers, so a built dataset holds exactly what the readers return, validation included.
Only Text / Tensor / Scalar features are used (`tfds.features.Image` needs TensorFlow), the files are ArrayRecord
and shuffling is off, so `as_data_source()` gives random-access sources in file order that Grain reads directly.

Build:   CirQueries(config="cirr", data_dir=D).download_and_prepare(
             download_config=tfds.download.DownloadConfig(manual_dir=ROOT))   (and the same for CirImages), or
         build_cir_dataset(ROOT, D, "cirr");
read:    split, images = load_built_split(D, "cirr", "val")  ->  (CIRSplit, ImageRecords);
command: python -m recall_jax.data.tfds_builders --dataset cirr --root /data/CIRR --out /data/cirr_array_record
         (every config of a dataset, `dataset_configs`: what a run with data.format="array_record" reads).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from recall_jax import files
from recall_jax.data.readers.circo import read_circo
from recall_jax.data.readers.cirr import read_cirr
from recall_jax.data.readers.fashioniq import read_fashioniq
from recall_jax.data.image import to_rgb
from recall_jax.data.records import CIRSplit, DataError, Query

VERSION = tfds.core.Version("1.0.0")
FILE_FORMAT = "array_record"
LAYOUT_SPLITS = {
    "fashioniq": ("train", "val", "test"),
    "cirr": ("train", "val", "test1"),
    "circo": ("val", "test"),
}
_MANUAL_INSTRUCTIONS = (
    "Point manual_dir at a local copy of the dataset in its published layout (FashionIQ: captions/, image_splits/, "
    "images/; CIRR: captions/, image_splits/ and the image folders they name; CIRCO: annotations/ and the image "
    "folder), or at a synthetic world written by recall_jax.data.synthetic in that layout.")


@dataclasses.dataclass
class CIRConfig(tfds.core.BuilderConfig):
  """Which layout to read and how.

  layout:         "fashioniq" | "cirr" | "circo".
  category:       FashionIQ category (one config per category, since each has its own gallery); None otherwise.
  splits:         the splits to build; default: all splits of the layout (LAYOUT_SPLITS).
  reader_options: extra keyword arguments of the layout's reader, as (name, value) pairs (e.g. image_ext, on_error).
  """

  layout: str = ""
  category: Optional[str] = None
  splits: tuple[str, ...] = ()
  reader_options: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if self.layout not in LAYOUT_SPLITS:
      raise ValueError(f"CIRConfig {self.name!r}: layout must be one of {sorted(LAYOUT_SPLITS)}, got {self.layout!r}")
    if (self.layout == "fashioniq") != (self.category is not None):
      raise ValueError(f"CIRConfig {self.name!r}: a category is required for fashioniq and only for it")
    if not self.splits:
      self.splits = LAYOUT_SPLITS[self.layout]


def default_configs() -> list[CIRConfig]:
  return [
      *(CIRConfig(name=f"fashioniq_{c}", version=VERSION, layout="fashioniq", category=c,
                  description=f"FashionIQ layout, category {c}") for c in ("dress", "shirt", "toptee")),
      CIRConfig(name="cirr", version=VERSION, layout="cirr", description="CIRR layout (rc2)"),
      CIRConfig(name="circo", version=VERSION, layout="circo", description="CIRCO layout"),
  ]


def dataset_configs(dataset: str, categories: Sequence[str] = ("dress", "shirt", "toptee"), image_ext: str = ".png",
                    on_error: str = "raise") -> list[CIRConfig]:
  """The configs that hold one dataset (FashionIQ: one per category), read with the given reader options.

  The readers' defaults give the registered configs; other options give configs whose name says them (e.g.
  fashioniq_dress_jpg_skip): TFDS allows one config per name, and a build read with other options is another one."""
  if dataset not in LAYOUT_SPLITS:
    raise ValueError(f"dataset must be one of {sorted(LAYOUT_SPLITS)}, got {dataset!r}")
  names = [f"fashioniq_{c}" for c in categories] if dataset == "fashioniq" else [dataset]
  options = (("image_ext", image_ext),) if dataset == "fashioniq" and image_ext != ".png" else ()
  options += (("on_error", on_error),) if on_error != "raise" else ()
  registered = {c.name: c for c in _CIRBuilder.BUILDER_CONFIGS}
  configs = []
  for name in names:
    if name not in registered:
      raise ValueError(f"no FashionIQ category {name[len('fashioniq_'):]!r} (configs: {sorted(registered)})")
    if not options:
      configs.append(registered[name])
      continue
    suffix = "".join(f"_{str(v).lstrip('.')}" for _, v in options)
    configs.append(dataclasses.replace(registered[name], name=name + suffix, reader_options=options,
                                       description=f"{registered[name].description}, read with {dict(options)}"))
  return configs


def read_layout_split(root: str, config: CIRConfig, split: str) -> CIRSplit:
  """The reader's CIRSplit for one split of `config` under `root` (the dataset in its real layout)."""
  options = dict(config.reader_options)
  if config.layout == "fashioniq":
    (result,) = read_fashioniq(root, split, categories=(config.category,), **options)
    return result
  if config.layout == "cirr":
    return read_cirr(root, split, **options)
  return read_circo(root, split, **options)


def _strings(values: Sequence[str]) -> np.ndarray:
  # An explicit dtype keeps empty lists (test splits have no targets) typed as strings.
  return np.asarray(list(values), dtype=np.object_)


def _optional_text(value: Optional[str], what: str, source: str) -> str:
  # Records store None as "": an empty category or group key would be ambiguous, so it is refused.
  if value == "":
    raise DataError(f"{source}: empty {what} cannot be stored (an empty string means None in the records)")
  return value or ""


class _CIRBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared configs and split generation; subclasses give the features and the records of one split."""

  VERSION = VERSION
  BUILDER_CONFIGS = default_configs()
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
  _DESCRIPTION = ""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS finds a builder's module through the `importlib_resources` backport, which it does not install.
    return epath.Path(__file__)

  def __init__(self, *, file_format: str = FILE_FORMAT, **kwargs: Any):
    if file_format != FILE_FORMAT:
      raise ValueError(f"{self.name} is written as {FILE_FORMAT} only (readable without TensorFlow), "
                       f"got file_format={file_format!r}")
    super().__init__(file_format=file_format, **kwargs)

  def _features(self) -> tfds.features.FeaturesDict:
    raise NotImplementedError

  def _records(self, split: CIRSplit) -> Iterator[tuple[str, dict[str, Any]]]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self._DESCRIPTION, features=self._features(),
                                 disable_shuffling=True, metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    root = os.fspath(dl_manager.manual_dir)
    generators = {}
    for split_name in self.builder_config.splits:
      split = read_layout_split(root, self.builder_config, split_name)
      self._split_metadata(split_name, split)
      generators[split_name] = self._records(split)
    return generators

  def _split_metadata(self, split_name: str, split: CIRSplit) -> None:
    """Split-level facts that are not per record, saved in the dataset's metadata.json."""
    self.info.metadata.setdefault("skipped", {})[split_name] = [list(s) for s in split.skipped]

  def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
    raise TypeError(f"{self.name} generates its examples in _split_generators")


class CirQueries(_CIRBuilder):
  """One record per query: index (file order), qid, reference, captions, targets, category, subset, group, source."""

  _DESCRIPTION = "Composed image retrieval queries (reference image name, modification texts, target names)."

  def _features(self) -> tfds.features.FeaturesDict:
    strings = tfds.features.Tensor(shape=(None,), dtype=np.str_)
    return tfds.features.FeaturesDict({
        "index": tfds.features.Scalar(dtype=np.int64),
        "qid": tfds.features.Text(),
        "reference": tfds.features.Text(),
        "captions": strings,
        "targets": strings,
        "category": tfds.features.Text(),
        "subset": strings,
        "group": tfds.features.Text(),
        "source": tfds.features.Text(),
    })

  def _records(self, split: CIRSplit) -> Iterator[tuple[str, dict[str, Any]]]:
    for index, query in enumerate(split.queries):
      yield f"{index:09d}", {
          "index": index,
          "qid": query.qid,
          "reference": query.reference,
          "captions": _strings(query.captions),
          "targets": _strings(query.targets),
          "category": _optional_text(query.category, "category", query.source),
          "subset": _strings(query.subset),
          "group": _optional_text(query.group, "group", query.source),
          "source": query.source,
      }


def _image_order(split: CIRSplit) -> list[str]:
  """Record order of a split's images: the gallery first, in gallery order, then the other images by name."""
  missing = [name for name in split.gallery if name not in split.images]
  if missing:
    raise DataError(f"{split.dataset}/{split.split}: gallery images without a file: {missing[:5]}")
  if len(set(split.gallery)) != len(split.gallery):
    raise DataError(f"{split.dataset}/{split.split}: the gallery lists an image twice")
  return list(split.gallery) + sorted(set(split.images) - set(split.gallery))


class CirImages(_CIRBuilder):
  """One record per image of a split: index, name, encoded bytes, gallery_index (-1: not in the gallery), path."""

  _DESCRIPTION = "Images of composed image retrieval splits, stored as their encoded file bytes."

  def _features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "index": tfds.features.Scalar(dtype=np.int64),
        "name": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "gallery_index": tfds.features.Scalar(dtype=np.int64),
        "path": tfds.features.Text(),
    })

  def _split_metadata(self, split_name: str, split: CIRSplit) -> None:
    # The name index lets a reader find an image without reading every record's bytes.
    super()._split_metadata(split_name, split)
    names = _image_order(split)
    self.info.metadata.setdefault("names", {})[split_name] = names
    self.info.metadata.setdefault("paths", {})[split_name] = [split.images[n] for n in names]
    self.info.metadata.setdefault("gallery_size", {})[split_name] = len(split.gallery)

  def _records(self, split: CIRSplit) -> Iterator[tuple[str, dict[str, Any]]]:
    gallery_index = {name: i for i, name in enumerate(split.gallery)}
    for index, name in enumerate(_image_order(split)):
      path = split.images[name]
      try:
        encoded = files.read_bytes(path)  # a local file or an object in a bucket
      except OSError as e:
        raise DataError(f"cannot read image {path!r} (image {name!r} of {split.dataset}/{split.split}): {e}") from e
      yield f"{index:09d}", {
          "index": index,
          "name": name,
          "image": encoded,
          "gallery_index": gallery_index.get(name, -1),
          "path": path,
      }


def build_cir_dataset(manual_dir: str, data_dir: str, config: str | CIRConfig) -> None:
  """Builds both cir_queries/<config> and cir_images/<config> under data_dir (a no-op for parts already built)."""
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  for builder_cls in (CirQueries, CirImages):
    builder_cls(config=config, data_dir=data_dir).download_and_prepare(download_config=download_config)


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(values: np.ndarray) -> tuple[str, ...]:
  return tuple(_text(v) for v in values)


class ImageRecords:
  """Random access to the images of a built split by name: `records(name) -> PIL RGB image` (or `.encoded(name)`).

  Picklable (it holds the ArrayRecord source and a name -> record index map), so Grain worker processes can use it.
  """

  def __init__(self, source: Any, names: Sequence[str], where: str):
    self.source = source
    self.where = where
    self.index = {name: i for i, name in enumerate(names)}

  def __len__(self) -> int:
    return len(self.index)

  def __contains__(self, name: str) -> bool:
    return name in self.index

  def encoded(self, name: str) -> bytes:
    if name not in self.index:
      raise DataError(f"image {name!r} is not in {self.where}")
    record = self.source[self.index[name]]
    if _text(record["name"]) != name:
      raise DataError(f"record {self.index[name]} of {self.where} holds {_text(record['name'])!r}, expected {name!r}")
    return record["image"]

  def __call__(self, name: str) -> Image.Image:
    encoded = self.encoded(name)
    try:
      with Image.open(io.BytesIO(encoded)) as image:
        image.load()
        return to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise DataError(f"cannot decode image {name!r} (record {self.index[name]} of {self.where}): "
                      f"{type(e).__name__}: {e}") from e


def _query(record: Mapping[str, Any]) -> Query:
  category, group = _text(record["category"]), _text(record["group"])
  return Query(
      qid=_text(record["qid"]),
      reference=_text(record["reference"]),
      captions=_texts(record["captions"]),
      targets=_texts(record["targets"]),
      category=category or None,
      subset=_texts(record["subset"]),
      group=group or None,
      source=_text(record["source"]),
  )


def _where(builder: tfds.core.DatasetBuilder, split: str) -> str:
  return f"{builder.name}/{builder.builder_config.name}/{split} under {os.fspath(builder.data_dir_root)!r}"


def built_problems(data_dir: str, config: str | CIRConfig, splits: Optional[Sequence[str]] = None) -> list[str]:
  """What is missing for `splits` (default: the config's) of both builders under data_dir, each naming its path;
  [] when every split is built with all its files (a build TFDS finished: it writes into incomplete.* first)."""
  out = []
  for builder_cls in (CirQueries, CirImages):
    builder = builder_cls(config=config, data_dir=data_dir)
    if not builder.is_prepared():
      out.append(f"{builder.data_dir} is not built (no dataset_info.json)")
      continue
    for split in splits or builder.builder_config.splits:
      if split not in builder.info.splits:
        out.append(f"{builder.data_dir} has no split {split!r} (built: {sorted(builder.info.splits)})")
        continue
      missing = [os.fspath(p) for p in builder.info.splits[split].filepaths if not epath.Path(p).exists()]
      if missing:
        out.append(f"{builder.data_dir}: split {split!r} lacks {missing[0]}" +
                   (f" and {len(missing) - 1} more files" if len(missing) > 1 else ""))
  return out


def load_built_images(data_dir: str, config: str | CIRConfig, split: str) -> ImageRecords:
  """Random access to the images of a built split (its metadata and records only: no query is read)."""
  builder = CirImages(config=config, data_dir=data_dir)
  if split not in builder.info.splits:
    raise DataError(f"split {split!r} of {builder.builder_config.name!r} is not built under {data_dir!r} "
                    f"(built: {sorted(builder.info.splits)})")
  names = builder.info.metadata["names"][split]
  source = builder.as_data_source(split=split)
  if len(source) != len(names):
    raise DataError(f"{_where(builder, split)} has {len(source)} records, its metadata names {len(names)}")
  return ImageRecords(source, names, _where(builder, split))


def load_built_split(data_dir: str, config: str | CIRConfig, split: str) -> tuple[CIRSplit, ImageRecords]:
  """A built split as the readers return it, plus random access to its encoded images.

  The CIRSplit's `images` map each name to the path it was read from at build time (provenance); the pixels come
  from the returned ImageRecords, which needs no file other than the ArrayRecord files.
  """
  query_builder = CirQueries(config=config, data_dir=data_dir)
  image_builder = CirImages(config=config, data_dir=data_dir)
  cfg = query_builder.builder_config
  if split not in query_builder.info.splits or split not in image_builder.info.splits:
    raise DataError(f"split {split!r} of {cfg.name!r} is not built under {data_dir!r} "
                    f"(built: {sorted(query_builder.info.splits)})")
  query_source = query_builder.as_data_source(split=split)
  queries = []
  for i in range(len(query_source)):
    record = query_source[i]
    if int(record["index"]) != i:
      raise DataError(f"record {i} of cir_queries/{cfg.name}/{split} under {data_dir!r} has index {record['index']}")
    queries.append(_query(record))
  metadata = image_builder.info.metadata
  names, paths = metadata["names"][split], metadata["paths"][split]
  cir_split = CIRSplit(
      dataset=cfg.layout,
      split=split,
      queries=tuple(queries),
      images=dict(zip(names, paths)),
      gallery=tuple(names[:metadata["gallery_size"][split]]),
      category=cfg.category,
      skipped=tuple((str(s), str(r)) for s, r in query_builder.info.metadata["skipped"][split]),
  )
  return cir_split, load_built_images(data_dir, config, split)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Builds every config of one dataset (`dataset_configs`) from its published layout: the folder a run with
  data.format="array_record" reads as data.array_record_dir."""
  import argparse
  parser = argparse.ArgumentParser(prog="python -m recall_jax.data.tfds_builders", description=main.__doc__)
  parser.add_argument("--dataset", required=True, choices=sorted(LAYOUT_SPLITS))
  parser.add_argument("--root", required=True, help="the dataset in its published layout (config data.root)")
  parser.add_argument("--out", required=True, help="the ArrayRecord folder (config data.array_record_dir)")
  parser.add_argument("--categories", default="dress,shirt,toptee", help="FashionIQ categories (data.categories)")
  parser.add_argument("--image_ext", default=".png", help="FashionIQ image extension (data.image_ext)")
  parser.add_argument("--on_error", default="raise", help="the readers' policy for bad records (data.on_error)")
  args = parser.parse_args(argv)
  configs = dataset_configs(args.dataset, tuple(c for c in args.categories.split(",") if c), args.image_ext,
                            args.on_error)
  for config in configs:
    build_cir_dataset(args.root, args.out, config)
  problems = [p for c in configs for p in built_problems(args.out, c)]
  if problems:
    raise SystemExit("build incomplete:\n  " + "\n  ".join(problems))
  print(f"built {[c.name for c in configs]} under {args.out}")


if __name__ == "__main__":
  main()
