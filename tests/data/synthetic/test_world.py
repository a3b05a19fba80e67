"""The generated world: byte-identical for a seed, loadable by the readers, held-out combinations really held out of
training, near-misses in every gallery, targets unique per the judge, images distinct and recognisable."""

import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from recall_jax.data.readers import read_circo, read_cirr, read_fashioniq
from recall_jax.data.synthetic import generate_world, is_held_out, load_manifest, oracle
from recall_jax.data.synthetic.attributes import COLOURS, Garment
from recall_jax.data.synthetic.render import Jitter, render

SMALL = {"fashioniq": {"train": 4, "val": 3, "test": 2}, "cirr": {"train": 5, "val": 4, "test1": 2},
         "circo": {"val": 3, "test": 2}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("world")
  generate_world(root, scale="tiny", seed=0)
  return root


def _files(root):
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(pathlib.Path(root).rglob("*")) if p.is_file()}


def _all_splits(world):
  for split in ("train", "val", "test"):
    yield from read_fashioniq(world / "fashioniq", split)
  for split in ("train", "val", "test1"):
    yield read_cirr(world / "cirr", split)
  for split in ("val", "test"):
    yield read_circo(world / "circo", split)


def _generate_files(root, **kwargs):
  generate_world(root, **kwargs)
  return _files(root)


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(world, tmp_path):
  # Another root and two rendering processes: neither may change a byte.
  again = _generate_files(tmp_path / "again", scale="tiny", seed=0, workers=2)
  first = _files(world)
  assert again.keys() == first.keys()
  assert [k for k in first if first[k] != again[k]] == []
  other = _generate_files(tmp_path / "other", scale=SMALL, seed=1)
  same_seed_small = _generate_files(tmp_path / "small", scale=SMALL, seed=0)
  common = [k for k in other if k in same_seed_small and k != "world.json"]
  assert any(k.endswith(".png") for k in common)
  assert any(other[k] != same_seed_small[k] for k in common if k.endswith(".png"))
  assert any(other[k] != same_seed_small[k] for k in common if "captions" in k)


def test_generate_refuses_non_empty_root_and_bad_counts(world, tmp_path):
  with pytest.raises(FileExistsError, match="not empty"):
    generate_world(world)
  with pytest.raises(ValueError, match="unknown scale"):
    generate_world(tmp_path / "a", scale="huge")
  with pytest.raises(ValueError, match="unknown cirr splits"):
    generate_world(tmp_path / "b", scale={"cirr": {"test": 3}}, layouts=("cirr",))


def test_manifest_counts_match_what_the_readers_load(world):
  manifest = load_manifest(world)
  assert manifest["seed"] == 0 and manifest["scale"] == "tiny" and len(manifest["held_out"]) == 6
  fiq = manifest["layouts"]["fashioniq"]["splits"]
  for split in ("train", "val", "test"):
    for s in read_fashioniq(world / "fashioniq", split):
      assert len(s.queries) == fiq[split][s.category]["queries"]
      assert len(s.gallery) == fiq[split][s.category]["images"]
  for split in ("train", "val", "test1"):
    s = read_cirr(world / "cirr", split)
    assert len(s.queries) == manifest["layouts"]["cirr"]["splits"][split]["queries"]
  circo_val = read_circo(world / "circo", "val")
  assert len(circo_val.gallery) == manifest["layouts"]["circo"]["images"]


def test_every_image_has_its_scene_graph_and_the_configured_size(world, tmp_path):
  for s in _all_splits(world):
    for name, path in list(s.images.items())[:5]:
      assert os.path.exists(os.path.splitext(path)[0] + ".json")
      with Image.open(path) as img:
        assert img.size == (112, 112) and img.mode == "RGB"
  generate_world(tmp_path / "w", scale={"cirr": {"val": 2}}, layouts=("cirr",), image_size=56)
  s = read_cirr(tmp_path / "w" / "cirr", "val")
  with Image.open(s.images[s.gallery[0]]) as img:
    assert img.size == (56, 56)


def test_held_out_combinations_absent_from_train_and_present_in_eval(world):
  seen_eval = False
  for s in _all_splits(world):
    o = oracle.Oracle(s.images)
    if s.split == "train":
      assert not [n for n in s.images if is_held_out(o.garment(n))]
    else:
      seen_eval |= any(is_held_out(o.garment(t)) for q in s.queries for t in q.targets)
  assert seen_eval


def test_targets_unique_and_near_misses_in_every_gallery(world):
  for s in _all_splits(world):
    o = oracle.Oracle(s.images)
    for q in s.queries:
      if not q.targets:
        continue
      text = " and ".join(q.captions)
      matches = [n for n in s.gallery if o.judge(q.reference, text, n)]
      # FashionIQ / CIRR: exactly the one target; CIRCO: exactly its ground-truth list.
      assert sorted(matches) == sorted(q.targets), (s.dataset, q.qid)
      target = o.garment(q.targets[0])
      near = [n for n in s.gallery if len(o.garment(n).diff(target)) == 1
              and o.garment(n).category == target.category]
      assert near, (s.dataset, q.qid)
      assert not any(o.judge(q.reference, text, n) for n in near)
      if s.dataset == "fashioniq":
        assert len(q.captions) == 2 and q.captions[0] != q.captions[1]
        assert all(o.judge(q.reference, c, q.target) for c in q.captions)


def test_cirr_img_sets_are_reference_target_and_four_near_misses(world):
  s = read_cirr(world / "cirr", "val")
  o = oracle.Oracle(s.images)
  for q in s.queries:
    assert len(set(q.subset)) == 6 and q.reference in q.subset and q.target in q.subset
    target = o.garment(q.target)
    others = [m for m in q.subset if m not in (q.reference, q.target)]
    assert all(len(o.garment(m).diff(target)) == 1 for m in others)


def test_circo_has_several_ground_truths(world):
  s = read_circo(world / "circo", "val")
  assert all(len(q.targets) >= 2 for q in s.queries)
  assert all(q.reference not in q.targets for q in s.queries)


def test_no_two_images_are_pixel_identical(world):
  arrays = set()
  paths = [p for p in sorted((world / "fashioniq" / "images").glob("*.png"))]
  for p in paths:
    arrays.add(np.asarray(Image.open(p)).tobytes())
  assert len(arrays) == len(paths)


@pytest.mark.parametrize("colour", sorted(COLOURS))
def test_the_named_colour_dominates_the_garment(colour):
  jitter = Jitter(dx=0.03, dy=-0.02, scale=0.95, brightness=1.05, hue=(6, -6, 4), background=(200, 215, 230),
                  phase=(0.3, 0.7))
  for pattern in ("stripes", "checks"):
    img = np.asarray(render(Garment("shirt", colour, pattern, "short", "knee", "v"), jitter, 112)).astype(float)
    garment_px = img[np.abs(img - np.array(jitter.background)).sum(-1) > 30]
    values, counts = np.unique(garment_px, axis=0, return_counts=True)
    commonest = values[np.argmax(counts)]
    nearest = min(COLOURS, key=lambda c: np.sum((np.array(COLOURS[c]) - commonest) ** 2))
    assert nearest == colour, (pattern, commonest)
    assert counts.max() > 0.3 * len(garment_px)


def test_attributes_change_pixels_where_expected():
  jitter = Jitter(dx=0.0, dy=0.0, scale=1.0, brightness=1.0, hue=(0, 0, 0), background=(210, 210, 210),
                  phase=(0.0, 0.0))
  base = Garment("dress", "red", "solid", "short", "knee", "round")

  def area(g):
    img = np.asarray(render(g, jitter, 112)).astype(int)
    return int((np.abs(img - 210).sum(-1) > 30).sum())

  assert area(base.replace(length="short")) < area(base) < area(base.replace(length="long"))
  assert area(base.replace(sleeves="none")) < area(base) < area(base.replace(sleeves="long"))
