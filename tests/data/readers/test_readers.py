"""Readers: the real layouts load into CIRSplits with the documented ids, galleries and targets; every kind of bad
input raises a DataError naming the file and the record, and skip mode drops and reports exactly the bad records."""

import json
import logging
import shutil

import pytest

from recall_jax.data.readers import read_circo, read_cirr, read_fashioniq
from recall_jax.data.records import DataError
from recall_jax.data.synthetic import generate_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("world")
  generate_world(root, scale={"fashioniq": {"train": 3, "val": 4, "test": 2}, "cirr": {"val": 5, "test1": 2},
                              "circo": {"val": 4, "test": 2}}, seed=3)
  return root


@pytest.fixture
def copy(world, tmp_path):
  """A private copy of one layout, to break."""

  def make(layout):
    shutil.copytree(world / layout, tmp_path / layout)
    return tmp_path / layout

  return make


def _edit_json(path, fn):
  data = json.loads(path.read_text())
  fn(data)
  path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------------------------------------------
# Loading.


def test_fashioniq_loads_one_split_per_category(world):
  root = world / "fashioniq"
  splits = read_fashioniq(root, "val")
  assert [s.category for s in splits] == ["dress", "shirt", "toptee"]
  for s in splits:
    ids = json.loads((root / "image_splits" / f"split.{s.category}.val.json").read_text())
    records = json.loads((root / "captions" / f"cap.{s.category}.val.json").read_text())
    assert s.dataset == "fashioniq" and s.split == "val" and s.skipped == ()
    assert s.gallery == tuple(ids)
    assert [q.qid for q in s.queries] == [f"{s.category}/{i}" for i in range(len(records))]
    for q, r in zip(s.queries, records):
      assert (q.reference, q.targets, q.captions, q.category) == (r["candidate"], (r["target"],),
                                                                 tuple(r["captions"]), s.category)
      assert q.source.endswith(f"cap.{s.category}.val.json#{q.qid.split('/')[1]}")
    assert all(s.images[n] == str(root / "images" / f"{n}.png") for n in s.gallery)
  test = read_fashioniq(root, "test", categories=("shirt",))
  assert len(test) == 1 and all(q.targets == () for q in test[0].queries)


def test_cirr_loads_subsets_and_test1_has_no_targets(world):
  root = world / "cirr"
  s = read_cirr(root, "val")
  mapping = json.loads((root / "image_splits" / "split.rc2.val.json").read_text())
  records = json.loads((root / "captions" / "cap.rc2.val.json").read_text())
  assert s.gallery == tuple(mapping)
  assert all(s.images[n] == str(root / "dev" / f"{n}.png") for n in s.gallery)
  for q, r in zip(s.queries, records):
    assert (q.qid, q.reference, q.target, q.captions, q.subset) == (
        str(r["pairid"]), r["reference"], r["target_hard"], (r["caption"],), tuple(r["img_set"]["members"]))
  assert all(q.targets == () and len(q.subset) == 6 for q in read_cirr(root, "test1").queries)


def test_circo_loads_all_ground_truths_and_the_whole_image_dir(world):
  root = world / "circo"
  s = read_circo(root, "val")
  records = json.loads((root / "annotations" / "val.json").read_text())
  files = sorted(p.stem for p in (root / "COCO2017_unlabeled" / "unlabeled2017").glob("*.jpg"))
  assert s.gallery == tuple(files) and all(len(n) == 12 for n in files)
  for q, r in zip(s.queries, records):
    assert q.qid == str(r["id"]) and q.reference == f"{r['reference_img_id']:012d}"
    assert q.targets[0] == f"{r['target_img_id']:012d}"
    assert sorted(q.targets) == sorted(f"{g:012d}" for g in r["gt_img_ids"])
  assert all(q.targets == () for q in read_circo(root, "test").queries)


def test_bad_arguments(world):
  with pytest.raises(ValueError, match="split must be one of"):
    read_cirr(world / "cirr", "test")
  with pytest.raises(ValueError, match="on_error"):
    read_circo(world / "circo", "val", on_error="ignore")
  with pytest.raises(ValueError, match="image_ext"):
    read_fashioniq(world / "fashioniq", "val", image_ext="png")


# ----------------------------------------------------------------------------------------------------------------
# Bad input: strict mode names file and record; skip mode drops and reports.


def test_wrong_image_extension_names_the_split_file_and_record(world):
  with pytest.raises(DataError, match=r"split\.dress\.val\.json: record 0 \('dress_val_00000'\): image .*not found"):
    read_fashioniq(world / "fashioniq", "val", image_ext=".jpg")


def test_fashioniq_missing_image_strict_and_skip(copy, caplog):
  root = copy("fashioniq")
  q = read_fashioniq(root, "val", categories=("dress",))[0].queries[1]
  (root / "images" / f"{q.target}.png").unlink()
  with pytest.raises(DataError, match=r"split\.dress\.val\.json: record \d+ .*image file not found"):
    read_fashioniq(root, "val", categories=("dress",))
  with caplog.at_level(logging.WARNING):
    (s,) = read_fashioniq(root, "val", categories=("dress",), on_error="skip")
  assert q.target not in s.gallery
  bad_queries = [src for src, _ in s.skipped if "cap.dress.val.json" in src]
  assert bad_queries and "cap.dress.val.json#1" in " ".join(bad_queries)
  assert all(q.target not in x.targets for x in s.queries)
  assert "skipped" in caplog.text and str(len(s.skipped)) in caplog.text


def test_fashioniq_target_outside_its_split_gallery_is_named(copy):
  root = copy("fashioniq")
  split = root / "image_splits" / "split.dress.val.json"
  q = read_fashioniq(root, "val", categories=("dress",))[0].queries[2]
  _edit_json(split, lambda ids: ids.remove(q.target))  # the image file stays: only the gallery lacks it
  with pytest.raises(DataError, match=rf"cap\.dress\.val\.json: record 2 .*target '{q.target}' is not a usable "
                                      r"image of the split's gallery split\.dress\.val\.json"):
    read_fashioniq(root, "val", categories=("dress",))
  (s,) = read_fashioniq(root, "val", categories=("dress",), on_error="skip")
  assert q.qid not in [x.qid for x in s.queries] and q.target not in s.images
  assert any(src.endswith("cap.dress.val.json#2") and "gallery" in why for src, why in s.skipped)


def test_fashioniq_unreadable_image(copy):
  root = copy("fashioniq")
  q = read_fashioniq(root, "val", categories=("shirt",))[0].queries[0]
  (root / "images" / f"{q.reference}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  with pytest.raises(DataError, match=rf"unreadable image .*{q.reference}\.png"):
    read_fashioniq(root, "val", categories=("shirt",))
  # Without the decode check only existence is verified.
  (s,) = read_fashioniq(root, "val", categories=("shirt",), verify_images=False)
  assert len(s.queries) == 4
  (s,) = read_fashioniq(root, "val", categories=("shirt",), on_error="skip")
  assert q.qid not in [x.qid for x in s.queries] and any("#0" in src for src, _ in s.skipped)


@pytest.mark.parametrize("field, expected", [("captions", "missing field 'captions'"),
                                             ("target", "missing field 'target'"),
                                             ("candidate", "missing field 'candidate'")])
def test_fashioniq_record_missing_field(copy, field, expected):
  root = copy("fashioniq")
  path = root / "captions" / "cap.toptee.val.json"
  _edit_json(path, lambda d: d[2].pop(field))
  with pytest.raises(DataError, match=rf"cap\.toptee\.val\.json: record 2.*{expected}"):
    read_fashioniq(root, "val", categories=("toptee",))
  (s,) = read_fashioniq(root, "val", categories=("toptee",), on_error="skip")
  assert [q.qid for q in s.queries] == ["toptee/0", "toptee/1", "toptee/3"]
  assert s.skipped == ((f"{path}#2", expected),)


def test_fashioniq_wrong_types_and_counts(copy):
  root = copy("fashioniq")
  path = root / "captions" / "cap.dress.val.json"
  _edit_json(path, lambda d: (d[0].update(captions=["only one"]), d[1].update(candidate=7), d.__setitem__(3, [])))
  (s,) = read_fashioniq(root, "val", categories=("dress",), on_error="skip")
  reasons = dict(s.skipped)
  assert reasons == {f"{path}#0": "field 'captions' must have 2 entries, got 1",
                     f"{path}#1": "field 'candidate' must be str, got int",
                     f"{path}#3": "record must be a JSON object, got list"}


def test_malformed_json_always_raises_naming_the_file(copy):
  root = copy("fashioniq")
  path = root / "captions" / "cap.dress.val.json"
  path.write_text('[{"candidate": "x", ')
  for mode in ("raise", "skip"):
    with pytest.raises(DataError, match=r"cap\.dress\.val\.json: malformed JSON"):
      read_fashioniq(root, "val", categories=("dress",), on_error=mode)
  path.write_text('{"candidate": "x"}')
  with pytest.raises(DataError, match=r"cap\.dress\.val\.json: the top level must be list, got dict"):
    read_fashioniq(root, "val", categories=("dress",))
  (root / "image_splits" / "split.shirt.val.json").unlink()
  with pytest.raises(DataError, match=r"split\.shirt\.val\.json: file not found"):
    read_fashioniq(root, "val", categories=("shirt",))


def test_cirr_bad_records(copy):
  root = copy("cirr")
  path = root / "captions" / "cap.rc2.val.json"

  def corrupt(d):
    del d[0]["img_set"]
    d[1]["img_set"]["members"] = d[1]["img_set"]["members"][:5]
    d[2]["reference"] = "dev-99999"
    d[3]["pairid"] = d[4]["pairid"]

  _edit_json(path, corrupt)
  with pytest.raises(DataError, match=r"cap\.rc2\.val\.json: record 0 \(pairid=0\): missing field 'img_set'"):
    read_cirr(root, "val")
  s = read_cirr(root, "val", on_error="skip")
  assert dict(s.skipped) == {
      f"{path}#0": "missing field 'img_set'",
      f"{path}#1": "field 'members' must have 6 entries, got 5",
      f"{path}#2": "reference 'dev-99999' is not a usable image of split.rc2.val.json",
      f"{path}#4": "duplicate pairid 4",
  }
  assert [q.qid for q in s.queries] == ["4"]


def test_cirr_missing_image_drops_gallery_entry_and_its_queries(copy):
  root = copy("cirr")
  s = read_cirr(root, "val")
  victim = s.queries[0].target
  (root / "dev" / f"{victim}.png").unlink()
  with pytest.raises(DataError, match=rf"split\.rc2\.val\.json: record \d+ \('{victim}'\): .*not found"):
    read_cirr(root, "val")
  skipped = read_cirr(root, "val", on_error="skip")
  assert victim not in skipped.gallery
  touching = {q.qid for q in s.queries if victim in (q.reference, q.target) + q.subset}
  assert {q.qid for q in skipped.queries} == {q.qid for q in s.queries} - touching
  assert len(skipped.skipped) == 1 + len(touching)


def test_circo_bad_records_and_images(copy):
  root = copy("circo")
  path = root / "annotations" / "val.json"
  s = read_circo(root, "val")
  gt = s.queries[2].targets[1]
  (root / "COCO2017_unlabeled" / "unlabeled2017" / f"{gt}.jpg").write_bytes(b"garbage")

  def corrupt(d):
    del d[0]["gt_img_ids"]
    d[1]["reference_img_id"] = "12"

  _edit_json(path, corrupt)
  with pytest.raises(DataError, match=rf"unlabeled2017/{gt}\.jpg: gallery image: unreadable"):
    read_circo(root, "val")
  skipped = read_circo(root, "val", on_error="skip")
  reasons = dict(skipped.skipped)
  bad_file = str(root / "COCO2017_unlabeled" / "unlabeled2017" / f"{gt}.jpg")
  assert reasons[bad_file].startswith("gallery image: unreadable")
  assert reasons[f"{path}#0"] == "missing field 'gt_img_ids'"
  assert reasons[f"{path}#1"] == "field 'reference_img_id' must be int, got str"
  assert reasons[f"{path}#2"].startswith(f"ground truth image {gt}.jpg is not a usable image")
  assert [q.qid for q in skipped.queries] == [q.qid for q in s.queries[3:]]
  with pytest.raises(DataError, match="CIRCO image directory not found"):
    read_circo(root, "val", image_dir="nowhere")
