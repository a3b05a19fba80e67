"""CIRCO reader: annotations/<split>.json + the COCO unlabeled2017 image directory -> CIRSplit.

Image names are COCO ids zero-padded to 12 digits (the file stem, without ".jpg"); int(name) gives the id back for
the submission file. Gallery = every `<12 digits>.jpg` in `image_dir`, sorted by name (the real gallery is all of
COCO unlabeled2017, ~123k images; the synthetic world writes its val+test pool to the same place). Targets =
target_img_id followed by the other gt_img_ids; test records have no targets. qid = str(id).
"""

from __future__ import annotations

import pathlib
import re
from typing import Optional, Union

from recall_jax import files
from recall_jax.data.readers import common
from recall_jax.data.records import CIRSplit, Query

SPLITS = ("val", "test")
DEFAULT_IMAGE_DIR = "COCO2017_unlabeled/unlabeled2017"  # relative to root, as the CIRCO repository lays it out
_COCO_NAME = re.compile(r"^\d{12}\.jpg$")


def image_name(image_id: int) -> str:
  return f"{image_id:012d}"


def read_circo(root: Union[str, pathlib.Path], split: str, image_dir: Optional[Union[str, pathlib.Path]] = None,
               on_error: str = "raise", *, verify_images: Optional[bool] = None) -> CIRSplit:
  """Reads one CIRCO split ("val" or "test").

  image_dir: the COCO unlabeled2017 folder (default root/COCO2017_unlabeled/unlabeled2017; relative = to root).
  verify_images: decode every gallery image up front; None = only when there are at most
    common.DECODE_CHECK_MAX_IMAGES (so the real 123k-image gallery is only listed).
  """
  if split not in SPLITS:
    raise ValueError(f"CIRCO split must be one of {SPLITS}, got {split!r}")
  root = files.path(files.absolute(root))  # a local folder or a bucket path
  image_dir = root / (DEFAULT_IMAGE_DIR if image_dir is None else image_dir)
  policy = common.Policy(on_error)
  ann_path = root / "annotations" / f"{split}.json"
  records = common.expect(common.load_json(ann_path), list, ann_path, "the top level")
  if not image_dir.is_dir():
    raise common.DataError(f"{image_dir}: CIRCO image directory not found")

  image_files = sorted(p for p in image_dir.iterdir() if _COCO_NAME.match(p.name))
  checker = common.ImageChecker(verify_images, len(image_files))
  images: dict[str, str] = {}
  for path in image_files:
    problem = checker.problem(path)
    if problem:
      policy.bad_file(path, f"gallery image: {problem}")
    else:
      images[path.stem] = str(path)

  queries: list[Query] = []
  for i, record in enumerate(records):
    try:
      qid = common.field(record, "id", int)
      reference = image_name(common.field(record, "reference_img_id", int))
      caption = common.field(record, "relative_caption", str)
      common.field(record, "shared_concept", str)
      targets: tuple[str, ...] = ()
      if split == "val":
        target = common.field(record, "target_img_id", int)
        gts = common.field(record, "gt_img_ids", list)
        if not gts or not all(isinstance(g, int) and not isinstance(g, bool) for g in gts):
          raise common.BadRecord("field 'gt_img_ids' must be a non-empty list of ints")
        targets = tuple(dict.fromkeys(image_name(g) for g in [target] + gts))
      for role, name in [("reference", reference)] + [("ground truth", t) for t in targets]:
        if name not in images:
          problem = checker.problem(image_dir / f"{name}.jpg")
          raise common.BadRecord(f"{role} image {name}.jpg is not a usable image of {image_dir}"
                                 + (f" ({problem})" if problem else ""))
      queries.append(Query(qid=str(qid), reference=reference, captions=(caption,), targets=targets,
                           source=f"{ann_path}#{i}"))
    except common.BadRecord as e:
      policy.bad(ann_path, i, str(e), common.record_id(record, "id"))

  skipped = policy.report(f"CIRCO {split}")
  return CIRSplit(dataset="circo", split=split, queries=tuple(queries), images=images, gallery=tuple(images),
                  skipped=skipped)
