"""CIRR reader: captions/cap.rc2.<split>.json + image_splits/split.rc2.<split>.json -> CIRSplit.

Gallery = every image of the split file, in file order (paths there are relative to the dataset root). qid = the
pairid; subset = img_set.members (6 names, the reference among them). test1 records have no target fields.
"""

from __future__ import annotations

import pathlib
from typing import Optional, Union

from recall_jax import files
from recall_jax.data.readers import common
from recall_jax.data.records import CIRSplit, Query

SPLITS = ("train", "val", "test1")
SUBSET_SIZE = 6


def read_cirr(root: Union[str, pathlib.Path], split: str, on_error: str = "raise", *,
              verify_images: Optional[bool] = None) -> CIRSplit:
  """Reads one CIRR split ("train", "val" or "test1").

  verify_images: decode every image up front; None = only when the split is small (common.DECODE_CHECK_MAX_IMAGES).
  """
  if split not in SPLITS:
    raise ValueError(f"CIRR split must be one of {SPLITS}, got {split!r}")
  root = files.path(files.absolute(root))  # a local folder or a bucket path
  policy = common.Policy(on_error)
  split_path = root / "image_splits" / f"split.rc2.{split}.json"
  cap_path = root / "captions" / f"cap.rc2.{split}.json"
  mapping = common.expect(common.load_json(split_path), dict, split_path, "the top level")
  records = common.expect(common.load_json(cap_path), list, cap_path, "the top level")
  checker = common.ImageChecker(verify_images, len(mapping))

  images: dict[str, str] = {}
  for i, (name, rel) in enumerate(mapping.items()):
    try:
      if not isinstance(rel, str) or not rel:
        raise common.BadRecord(f"path of image {name!r} must be a non-empty string, got {rel!r}")
      path = _path_of(root, rel)
      checker.require(path, f"image {name!r}")
      images[name] = str(path)
    except common.BadRecord as e:
      policy.bad(split_path, i, str(e), repr(name))

  queries: list[Query] = []
  pairids: set[int] = set()
  for i, record in enumerate(records):
    try:
      pairid = common.field(record, "pairid", int)
      if pairid in pairids:
        raise common.BadRecord(f"duplicate pairid {pairid}")
      reference = common.field(record, "reference", str)
      caption = common.field(record, "caption", str)
      members = common.string_list(common.field(record, "img_set", dict), "members", SUBSET_SIZE)
      targets = () if split == "test1" else (common.field(record, "target_hard", str),)
      if split != "test1":
        common.field(record, "target_soft", dict)
      for role, name in [("reference", reference)] + [("target", t) for t in targets] + [
          ("img_set member", m) for m in members]:
        if name not in images:
          raise common.BadRecord(f"{role} {name!r} is not a usable image of {split_path.name}"
                                 + (f" ({checker.problem(_path_of(root, mapping[name]))})"
                                    if name in mapping and isinstance(mapping[name], str) else ""))
      pairids.add(pairid)
      queries.append(Query(qid=str(pairid), reference=reference, captions=(caption,), targets=targets,
                           subset=members, source=f"{cap_path}#{i}"))
    except common.BadRecord as e:
      policy.bad(cap_path, i, str(e), common.record_id(record, "pairid"))

  skipped = policy.report(f"CIRR {split}")
  return CIRSplit(dataset="cirr", split=split, queries=tuple(queries), images=images, gallery=tuple(images),
                  skipped=skipped)


def _path_of(root: pathlib.Path, rel: str) -> pathlib.Path:
  """The split file's "./dev/x.png" relative to the dataset root, normalised (symlinks kept)."""
  return files.path(files.normpath(root / rel))
