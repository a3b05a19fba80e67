"""FashionIQ reader: captions/cap.<cat>.<split>.json + image_splits/split.<cat>.<split>.json -> a CIRSplit per category.

Gallery = the split file's ids, in file order; every candidate and target must be one of them. qid =
"<category>/<record index>". Train/val records need "candidate", "target" and two "captions"; test records need no
"target" (one is used when present).
"""

from __future__ import annotations

import pathlib
from typing import Optional, Sequence, Union

from recall_jax import files
from recall_jax.data.readers import common
from recall_jax.data.records import CIRSplit, Query

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")


def read_fashioniq(root: Union[str, pathlib.Path], split: str, categories: Sequence[str] = CATEGORIES,
                   image_ext: str = ".png", on_error: str = "raise", *, image_dir: str = "images",
                   verify_images: Optional[bool] = None) -> list[CIRSplit]:
  """Reads one FashionIQ split, one CIRSplit per category (in `categories` order).

  image_ext: extension of `<image_dir>/<id><ext>` (".png" or ".jpg" copies exist in the wild).
  verify_images: decode every image up front; None = only when the split is small (common.DECODE_CHECK_MAX_IMAGES).
  """
  if split not in SPLITS:
    raise ValueError(f"FashionIQ split must be one of {SPLITS}, got {split!r}")
  if not image_ext.startswith("."):
    raise ValueError(f"image_ext must start with '.', got {image_ext!r}")
  root = files.path(files.absolute(root))  # a local folder or a bucket path
  return [_read_category(root, split, cat, image_ext, on_error, root / image_dir, verify_images)
          for cat in categories]


def _read_category(root: pathlib.Path, split: str, cat: str, image_ext: str, on_error: str,
                   image_root: pathlib.Path, verify_images: Optional[bool]) -> CIRSplit:
  policy = common.Policy(on_error)
  split_path = root / "image_splits" / f"split.{cat}.{split}.json"
  cap_path = root / "captions" / f"cap.{cat}.{split}.json"
  ids = common.expect(common.load_json(split_path), list, split_path, "the top level")
  records = common.expect(common.load_json(cap_path), list, cap_path, "the top level")
  checker = common.ImageChecker(verify_images, len(ids))

  images: dict[str, str] = {}
  gallery: list[str] = []
  for i, name in enumerate(ids):
    try:
      if not isinstance(name, str) or not name:
        raise common.BadRecord(f"image id must be a non-empty string, got {name!r}")
      if name in images:
        raise common.BadRecord(f"duplicate image id {name!r}")
      path = image_root / f"{name}{image_ext}"
      checker.require(path, f"image {name!r}")
      images[name] = str(path)
      gallery.append(name)
    except common.BadRecord as e:
      policy.bad(split_path, i, str(e), repr(name) if isinstance(name, str) else None)

  queries: list[Query] = []
  for i, record in enumerate(records):
    try:
      reference = common.field(record, "candidate", str)
      captions = common.string_list(record, "captions", 2)
      if split != "test" or "target" in record:
        targets = (common.field(record, "target", str),)
      else:
        targets = ()
      for role, name in [("candidate", reference)] + [("target", t) for t in targets]:
        if name not in images:  # a target outside the gallery could never be retrieved
          problem = checker.problem(image_root / f"{name}{image_ext}") if name not in ids else None
          raise common.BadRecord(f"{role} {name!r} is not a usable image of the split's gallery {split_path.name}"
                                 + (f" ({problem})" if problem else ""))
      queries.append(Query(qid=f"{cat}/{i}", reference=reference, captions=captions, targets=targets,
                           category=cat, source=f"{cap_path}#{i}"))
    except common.BadRecord as e:
      policy.bad(cap_path, i, str(e), common.record_id(record, "candidate"))

  skipped = policy.report(f"FashionIQ {cat}/{split}")
  return CIRSplit(dataset="fashioniq", split=split, category=cat, queries=tuple(queries), images=images,
                  gallery=tuple(gallery), skipped=skipped)
