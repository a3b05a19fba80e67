"""The synthetic world written in the real FashionIQ, CIRR and CIRCO file layouts: the file names and JSON fields of
each dataset's public release, which the loaders in data/readers read.

Each builder samples its own triplets and image pools and returns what to write (JSON files and image jobs, paths
relative to the world root); world.py does the writing. Pools are shuffled before naming, so neither names nor gallery
order leak which image is whose target.

  fashioniq/images/<cat>_<split>_<n>.png (+ .json scene graph), fashioniq/captions/cap.<cat>.<split>.json,
  fashioniq/image_splits/split.<cat>.<split>.json; splits train / val / test (test captions have no "target");
  one gallery per (category, split): its split file, holding every reference, target and near-miss of its triplets.
  cirr/{train,dev,test1}/<prefix>-<n>.png (+ .json), cirr/captions/cap.rc2.<split>.json, cirr/image_splits/
  split.rc2.<split>.json; splits train / val / test1; categories mixed; img_set = reference, target and 4
  near-misses of that target, shuffled (reference_rank / target_rank index into members); test1 has no targets.
  circo/COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg (+ .json), circo/annotations/{val,test}.json; one pool
  shared by val and test (as COCO is); each target is rendered 1-3 times more with other jitter, and gt_img_ids lists
  every image of the pool with the target's garment (target_img_id first).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from recall_jax.data.synthetic import language
from recall_jax.data.synthetic.attributes import CATEGORIES, Garment
from recall_jax.data.synthetic.render import Jitter
from recall_jax.data.synthetic.triplets import ImagePool, Triplet, sample_triplet

FASHIONIQ_SPLITS = ("train", "val", "test")
CIRR_SPLITS = ("train", "val", "test1")
CIRR_DIRS = {"train": "train", "val": "dev", "test1": "test1"}
CIRCO_SPLITS = ("val", "test")
CIRCO_IMAGE_DIR = "COCO2017_unlabeled/unlabeled2017"
NEAR_MISSES = {"fashioniq": 3, "cirr": 4, "circo": 3}


@dataclasses.dataclass(frozen=True)
class ImageJob:
  path: str  # relative to the world root, with the image extension; the scene graph goes beside it as .json
  garment: Garment
  jitter: Jitter

  def scene_graph(self) -> dict[str, Any]:
    return {**self.garment.to_json(), "jitter": self.jitter.to_json()}


@dataclasses.dataclass
class LayoutFiles:
  json_files: dict[str, Any]  # relative path -> JSON value
  images: list[ImageJob]
  summary: dict[str, Any]  # counts for the manifest


def _captions(rng: np.random.Generator, t: Triplet, n: int) -> list[str]:
  """`n` distinct paraphrases of the triplet's edit."""
  out: list[str] = []
  for _ in range(100):
    text = language.compose_edit(t.reference, t.target, rng)
    if text not in out:
      out.append(text)
    if len(out) == n:
      return out
  raise RuntimeError(f"could not draw {n} distinct paraphrases for {t}")


def _name_pool(rng: np.random.Generator, pool: ImagePool, name: Callable[[int], str]) -> list[str]:
  """Names for the pool's images, assigned in a random order; returns names indexed by pool index."""
  order = rng.permutation(len(pool))
  names = [""] * len(pool)
  for rank, index in enumerate(order):
    names[int(index)] = name(rank)
  return names


def _in_name_order(names: list[str]) -> list[int]:
  return sorted(range(len(names)), key=names.__getitem__)


def fashioniq(rng: np.random.Generator, counts: Mapping[str, int]) -> LayoutFiles:
  """`counts[split]` triplets per category and split."""
  files, images, summary = {}, [], {}
  for split in FASHIONIQ_SPLITS:
    for cat in CATEGORIES:
      pool, rows = ImagePool(rng), []
      for _ in range(counts.get(split, 0)):
        t = sample_triplet(rng, cat, train=split == "train")
        ref, tgt = pool.get(t.reference), pool.get(t.target)
        pool.near_misses(t, NEAR_MISSES["fashioniq"])
        rows.append((ref, tgt, _captions(rng, t, 2)))
      if not rows:
        continue
      names = _name_pool(rng, pool, lambda k, cat=cat, split=split: f"{cat}_{split}_{k:05d}")
      records = []
      for ref, tgt, caps in rows:
        record = {"candidate": names[ref], "target": names[tgt], "captions": caps}
        if split == "test":
          del record["target"]
        records.append(record)
      files[f"fashioniq/captions/cap.{cat}.{split}.json"] = records
      files[f"fashioniq/image_splits/split.{cat}.{split}.json"] = [names[i] for i in _in_name_order(names)]
      images += [ImageJob(f"fashioniq/images/{names[i]}.png", *pool.items[i]) for i in _in_name_order(names)]
      summary.setdefault(split, {})[cat] = {"queries": len(rows), "images": len(pool)}
  return LayoutFiles(files, images, summary)


def cirr(rng: np.random.Generator, counts: Mapping[str, int]) -> LayoutFiles:
  """`counts[split]` triplets per split, categories mixed."""
  files, images, summary = {}, [], {}
  for split in CIRR_SPLITS:
    pool, rows = ImagePool(rng), []
    for _ in range(counts.get(split, 0)):
      cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
      t = sample_triplet(rng, cat, train=split == "train")
      ref, tgt = pool.get(t.reference), pool.get(t.target)
      members = [ref, tgt] + pool.near_misses(t, NEAR_MISSES["cirr"])
      members = [members[i] for i in rng.permutation(len(members))]
      rows.append((ref, tgt, members, _captions(rng, t, 1)[0]))
    if not rows:
      continue
    prefix = CIRR_DIRS[split]
    names = _name_pool(rng, pool, lambda k, prefix=prefix: f"{prefix}-{k:05d}")
    records = []
    for pairid, (ref, tgt, members, caption) in enumerate(rows):
      img_set = {"id": pairid, "members": [names[m] for m in members], "reference_rank": members.index(ref)}
      record = {"pairid": pairid, "reference": names[ref], "caption": caption, "img_set": img_set}
      if split != "test1":
        record.update(target_hard=names[tgt], target_soft={names[tgt]: 1.0})
        img_set["target_rank"] = members.index(tgt)
      records.append(record)
    order = _in_name_order(names)
    files[f"cirr/captions/cap.rc2.{split}.json"] = records
    files[f"cirr/image_splits/split.rc2.{split}.json"] = {names[i]: f"./{prefix}/{names[i]}.png" for i in order}
    images += [ImageJob(f"cirr/{prefix}/{names[i]}.png", *pool.items[i]) for i in order]
    summary[split] = {"queries": len(rows), "images": len(pool)}
  return LayoutFiles(files, images, summary)


def circo(rng: np.random.Generator, counts: Mapping[str, int]) -> LayoutFiles:
  """`counts[split]` queries per split over one shared image pool, several ground truths each."""
  pool, rows = ImagePool(rng), {}
  for split in CIRCO_SPLITS:
    rows[split] = []
    for _ in range(counts.get(split, 0)):
      cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
      t = sample_triplet(rng, cat, train=False)
      ref, tgt = pool.get(t.reference), pool.new(t.target)
      for _ in range(int(rng.integers(1, 4))):
        pool.new(t.target)
      pool.near_misses(t, NEAR_MISSES["circo"])
      rows[split].append((t, ref, tgt, _captions(rng, t, 1)[0]))
  ids = [int(v) for v in _name_pool(rng, pool, lambda k: str(k + 1))]
  files, summary = {}, {}
  for split in CIRCO_SPLITS:
    if not rows[split]:
      continue
    records = []
    for qid, (t, ref, tgt, caption) in enumerate(rows[split]):
      record = {"id": qid, "reference_img_id": ids[ref], "relative_caption": caption,
                "shared_concept": language.CATEGORY_NOUN[t.target.category]}
      if split == "val":
        others = sorted(ids[i] for i in pool.by_garment[t.target] if i != tgt)
        record.update(target_img_id=ids[tgt], gt_img_ids=[ids[tgt]] + others, semantic_aspects=list(t.changed))
      records.append(record)
    files[f"circo/annotations/{split}.json"] = records
    summary[split] = {"queries": len(rows[split])}
  images = [ImageJob(f"circo/{CIRCO_IMAGE_DIR}/{ids[i]:012d}.jpg", *pool.items[i])
            for i in sorted(range(len(pool)), key=ids.__getitem__)]
  return LayoutFiles(files, images, summary)


BUILDERS: Mapping[str, Callable[[np.random.Generator, Mapping[str, int]], LayoutFiles]] = {
    "fashioniq": fashioniq, "cirr": cirr, "circo": circo}
SPLITS = {"fashioniq": FASHIONIQ_SPLITS, "cirr": CIRR_SPLITS, "circo": CIRCO_SPLITS}
