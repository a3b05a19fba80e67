"""Grain pipelines: exact content, determinism per (seed, epoch), process shards, exact resume, fixed shapes,
micro-groups kept whole, evaluation batches, and loud errors for missing images."""

import os

import jax
import numpy as np
import pytest
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from recall_jax.data import pipeline, prompts
from recall_jax.data.image import ImageBuckets, load_image, preprocess_images
from recall_jax.data.records import CIRSplit, DataError, Query
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import build_tiny_tokenizer

QUERY_LENGTHS = (192,)
TARGET_LENGTHS = (128,)


@pytest.fixture(scope="module")
def tokenizer():
  return build_tiny_tokenizer()


def _write_images(root, sizes):
  rng = np.random.default_rng(0)
  paths = {}
  for i, (h, w) in enumerate(sizes):
    path = os.path.join(root, f"img{i}.png")
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    paths[f"img{i}"] = path
  return paths


def _queries():
  """15 triplets: two micro-groups of 3 and 2 on the same reference, a group of 2, singletons, shared targets."""
  spec = [  # (reference, target, group)
      (0, 1, "g0"), (0, 2, "g0"), (0, 3, "g0"), (0, 4, "g1"), (0, 5, "g1"),
      (6, 7, "g2"), (6, 8, "g2"), (1, 9, None), (2, 9, None), (3, 10, None),
      (4, 11, None), (5, 0, None), (7, 6, None), (8, 2, None), (9, 3, None),
  ]
  return [Query(qid=f"q{i}", reference=f"img{r}", captions=(f"make it look like picture {t}",),
                targets=(f"img{t}",), group=g, source=f"test#{i}") for i, (r, t, g) in enumerate(spec)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("world"))
  sizes = [(56, 56), (60, 64), (80, 70), (40, 90)] * 3
  paths = _write_images(root, sizes)
  queries = _queries()
  split = CIRSplit(dataset="cirr", split="train", queries=tuple(queries), images=paths,
                   gallery=tuple(sorted(paths)))
  return split


def _cfg(**overrides):
  kwargs = dict(image_buckets=ImageBuckets.square(56), query_lengths=QUERY_LENGTHS, target_lengths=TARGET_LENGTHS)
  kwargs.update(overrides)
  return pipeline.EncodeConfig(**kwargs)


def _train(world, tokenizer, **overrides):
  kwargs = dict(dataset="cirr", load=pipeline.FileImages(world.images), tokenizer=tokenizer, cfg=_cfg(),
                global_batch_size=4, seed=7, num_epochs=2, process_index=0, process_count=1)
  kwargs.update(overrides)
  return pipeline.train_dataset(world.queries, **kwargs)


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_content_matches_direct_encoding(world, tokenizer):
  ds = _train(world, tokenizer)
  batch = ds[0]
  assert batch["valid"].any()
  for slot in np.flatnonzero(batch["valid"]):
    q = world.queries[batch["example_index"][slot]]
    for side, name, text, lengths in (("query", q.reference, prompts.query_prompt("cirr", q.captions), QUERY_LENGTHS),
                                      ("target", q.target, prompts.target_prompt(), TARGET_LENGTHS)):
      image = ImageBuckets.square(56).resize(load_image(world.images[name]))
      pixels, grid = preprocess_images([image])
      np.testing.assert_array_equal(batch[f"{side}_pixel_values"][slot], pixels)
      np.testing.assert_array_equal(batch[f"{side}_image_grid_thw"][slot], grid[0])
      tokens = prompts.tokenize_batch(tokenizer, [text], [[4]], lengths)
      np.testing.assert_array_equal(batch[f"{side}_input_ids"][slot], tokens["input_ids"][0])
      np.testing.assert_array_equal(batch[f"{side}_attention_mask"][slot], tokens["attention_mask"][0])


def _collect(ds):
  return [ds[i] for i in range(len(ds))]


def test_deterministic_per_seed_and_epoch(world, tokenizer):
  a, b = _collect(_train(world, tokenizer)), _collect(_train(world, tokenizer))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    _assert_batches_equal(x, y)
  # Epochs lie end to end: the first epoch's batches are those of a one-epoch run.
  first = _collect(_train(world, tokenizer, num_epochs=1))
  for x, y in zip(first, a):
    _assert_batches_equal(x, y)
  order = [np.concatenate([x["example_index"] for x in part]) for part in (a[:len(first)], a[len(first):])]
  assert sorted(order[0][order[0] >= 0]) == sorted(order[1][order[1] >= 0]) == list(range(len(world.queries)))
  assert not np.array_equal(order[0], order[1])
  other_seed = _collect(_train(world, tokenizer, seed=8, num_epochs=1))
  assert not np.array_equal(np.concatenate([x["example_index"] for x in other_seed]), order[0])


@pytest.mark.parametrize("grouped", [True, False])
def test_process_shards_are_disjoint_and_cover_each_epoch(world, tokenizer, grouped):
  per_process = [_train(world, tokenizer, grouped=grouped, num_epochs=1, process_index=p, process_count=2)
                 for p in range(2)]
  assert len(per_process[0]) == len(per_process[1])
  seen = []
  for ds in per_process:
    for i in range(len(ds)):
      batch = ds[i]
      assert batch["valid"].shape == (2,)
      seen.extend(batch["example_index"][batch["valid"]].tolist())
  assert sorted(seen) == list(range(len(world.queries)))


def test_shapes_fixed_across_batches(world, tokenizer):
  batches = _collect(_train(world, tokenizer))
  shapes = {k: v.shape for k, v in batches[0].items()}
  assert shapes["query_input_ids"] == (4, QUERY_LENGTHS[0])
  assert shapes["target_attention_mask"] == (4, TARGET_LENGTHS[0])
  assert shapes["query_pixel_values"] == (4, 16, 1176)
  assert shapes["target_image_grid_thw"] == (4, 3)
  for batch in batches:
    assert {k: v.shape for k, v in batch.items()} == shapes
    assert batch["query_input_ids"].dtype == np.int32 and batch["valid"].dtype == bool


def test_micro_groups_stay_in_one_batch(world, tokenizer):
  ds = _train(world, tokenizer, num_epochs=3)
  batch_of = {}
  for i in range(len(ds)):
    batch = ds[i]
    idx, groups = batch["example_index"], batch["group_ids"]
    for slot in np.flatnonzero(batch["valid"]):
      key = world.queries[idx[slot]].group_key
      batch_of.setdefault(key, set()).add(i)
      assert groups[slot] >= 0
    # Same group id <=> same micro-group key, within a batch.
    keys = [world.queries[idx[s]].group_key for s in np.flatnonzero(batch["valid"])]
    ids = groups[batch["valid"]].tolist()
    assert len(set(zip(keys, ids))) == len(set(keys)) == len(set(ids))
    assert (groups[~batch["valid"]] == -1).all()
  for key in ("g0", "g1", "g2"):
    assert len(batch_of[key]) == 3, key  # one batch per epoch, three epochs


def test_negative_only_slots_are_targets_only(world, tokenizer):
  """A hard negative (Query.negative_only) is a valid slot whose query is no loss row, batched with its group."""
  extra = Query(qid="neg", reference="img0", captions=world.queries[0].captions, targets=("img11",), group="g0",
                negative_only=True)
  queries = (*world.queries, extra)
  ds = pipeline.train_dataset(queries, dataset="cirr", load=pipeline.FileImages(world.images), tokenizer=tokenizer,
                              cfg=_cfg(), global_batch_size=8, seed=7, num_epochs=2, process_index=0,
                              process_count=1)
  seen = 0
  for i in range(len(ds)):
    batch = ds[i]
    idx, valid = batch["example_index"], batch["valid"]
    want = np.asarray([v and not queries[k].negative_only for k, v in zip(idx, valid)])
    np.testing.assert_array_equal(batch["query_valid"], want)
    if (idx == len(queries) - 1).any():
      seen += 1
      slot = int(np.flatnonzero(idx == len(queries) - 1)[0])
      assert valid[slot] and not batch["query_valid"][slot]
      assert batch["group_ids"][slot] in batch["group_ids"][batch["query_valid"]]  # next to its group's queries
  assert seen == 2  # once per epoch


def test_target_ids_mark_duplicate_targets(world, tokenizer):
  ds = _train(world, tokenizer, grouped=False, global_batch_size=16, num_epochs=1)
  batch = ds[0]
  valid = batch["valid"]
  names = [world.queries[i].target for i in batch["example_index"][valid]]
  ids = batch["target_ids"][valid]
  for a in range(len(names)):
    for b in range(len(names)):
      assert (names[a] == names[b]) == (ids[a] == ids[b])
  assert (batch["target_ids"][~valid] == -1).all() and (~valid).sum() == 1


def test_resume_from_iterator_state_continues_exactly(world, tokenizer):
  it = pipeline.make_iterator(_train(world, tokenizer))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]  # crosses into epoch 1
  fresh = pipeline.make_iterator(_train(world, tokenizer))
  fresh.set_state(state)
  for want in expected:
    _assert_batches_equal(next(fresh), want)


def test_resume_matches_with_threads(world, tokenizer):
  ds = _train(world, tokenizer)
  reference = _collect(ds)
  it = pipeline.make_iterator(ds, num_threads=2, prefetch=2)
  got = [next(it) for _ in range(2)]
  state = it.get_state()
  fresh = pipeline.make_iterator(_train(world, tokenizer), num_threads=2)
  fresh.set_state(state)
  got += list(fresh)
  assert len(got) == len(reference)
  for a, b in zip(got, reference):
    _assert_batches_equal(a, b)


def test_caption_flip_is_deterministic_and_swaps(world, tokenizer):
  fiq = [Query(qid=f"f{i}", reference=f"img{i}", captions=(f"is red {i}", f"has long sleeves {i}"),
               targets=(f"img{i + 1}",), category="dress", source=f"fiq#{i}") for i in range(8)]
  kwargs = dict(dataset="fashioniq", load=pipeline.FileImages(world.images), tokenizer=tokenizer,
                global_batch_size=8, seed=3, grouped=False, num_epochs=1, process_index=0, process_count=1)
  flipped = pipeline.train_dataset(fiq, cfg=_cfg(flip_captions=True), **kwargs)[0]
  again = pipeline.train_dataset(fiq, cfg=_cfg(flip_captions=True), **kwargs)[0]
  _assert_batches_equal(flipped, again)
  swaps = []
  for slot in range(8):
    q = fiq[flipped["example_index"][slot]]
    options = {flip: prompts.tokenize_batch(tokenizer, [prompts.query_prompt(
        "fashioniq", q.captions[::-1] if flip else q.captions, "dress")], [[4]], QUERY_LENGTHS)["input_ids"][0]
               for flip in (False, True)}
    matches = [flip for flip, ids in options.items() if np.array_equal(ids, flipped["query_input_ids"][slot])]
    assert len(matches) == 1
    swaps.append(matches[0])
  assert any(swaps) and not all(swaps)


def test_image_buckets_pad_patches(world, tokenizer):
  cfg = _cfg(image_buckets=ImageBuckets([(56, 56), (56, 112)]))
  ds = _train(world, tokenizer, cfg=cfg, grouped=False, global_batch_size=16, num_epochs=1)
  batch = ds[0]
  assert batch["query_pixel_values"].shape == (16, 32, 1176)
  for slot in range(16):
    grid = batch["query_image_grid_thw"][slot]
    n = int(np.prod(grid))
    assert n in (16, 32)
    assert (batch["query_pixel_values"][slot, n:] == 0).all()
    assert np.abs(batch["query_pixel_values"][slot, :n]).sum(axis=1).min() > 0
  assert {tuple(g) for g in batch["query_image_grid_thw"]} == {(1, 4, 4), (1, 4, 8)}


def test_missing_image_raises_naming_the_file(world, tokenizer, tmp_path):
  images = dict(world.images)
  missing = str(tmp_path / "gone.png")
  images["img0"] = missing
  ds = _train(world, tokenizer, load=pipeline.FileImages(images), grouped=False, global_batch_size=16,
              num_epochs=1)
  with pytest.raises(DataError, match="gone.png"):
    next(pipeline.make_iterator(ds))
  unknown = pipeline.FileImages({})
  with pytest.raises(DataError, match="'img3'"):
    unknown("img3")


def test_training_query_without_target_is_rejected(world, tokenizer):
  bad = [Query(qid="x", reference="img0", captions=("c",), source="file.json#4")]
  with pytest.raises(DataError, match="file.json#4"):
    pipeline.train_dataset(bad, dataset="cirr", load=pipeline.FileImages(world.images), tokenizer=tokenizer,
                           cfg=_cfg(), global_batch_size=4, seed=0, process_index=0, process_count=1)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_datasets_cover_queries_and_gallery(world, tokenizer, process_count):
  seen_queries, seen_gallery = [], []
  for p in range(process_count):
    common = dict(load=pipeline.FileImages(world.images), tokenizer=tokenizer, cfg=_cfg(), global_batch_size=4,
                  process_index=p, process_count=process_count)
    qds = pipeline.eval_query_dataset(world, **common)
    gds = pipeline.eval_gallery_dataset(world, **common)
    assert len(qds) == 4 and len(gds) == 3  # 15 queries, 12 gallery images
    for batch in _collect(qds):
      assert batch["query_input_ids"].shape == (4 // process_count, QUERY_LENGTHS[0])
      assert (batch["index"][~batch["valid"]] == -1).all()
      seen_queries.extend(batch["index"][batch["valid"]].tolist())
    for batch in _collect(gds):
      assert batch["target_pixel_values"].shape == (4 // process_count, 16, 1176)
      seen_gallery.extend(batch["index"][batch["valid"]].tolist())
  assert sorted(seen_queries) == list(range(15))
  assert sorted(seen_gallery) == list(range(12))
  # The last query batch is padded: the slot after query 14 is masked.
  last = pipeline.eval_query_dataset(world, load=pipeline.FileImages(world.images), tokenizer=tokenizer,
                                     cfg=_cfg(), global_batch_size=4, process_index=0, process_count=1)[3]
  assert last["valid"].tolist() == [True, True, True, False]
  first = pipeline.eval_gallery_dataset(world, load=pipeline.FileImages(world.images), tokenizer=tokenizer,
                                        cfg=_cfg(), global_batch_size=4, process_index=0, process_count=1)[0]
  target_tokens = prompts.tokenize_batch(tokenizer, [prompts.target_prompt()], [[4]], TARGET_LENGTHS)["input_ids"]
  np.testing.assert_array_equal(first["target_input_ids"], np.repeat(target_tokens, 4, axis=0))


def test_batch_size_must_divide_over_processes(world, tokenizer):
  with pytest.raises(ValueError, match="multiple of the process count"):
    _train(world, tokenizer, global_batch_size=5, process_count=2)


def test_worker_processes_give_the_same_batches(world, tokenizer):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags; a main program parses them.
  reference = _collect(_train(world, tokenizer, num_epochs=1))
  it = pipeline.make_iterator(_train(world, tokenizer, num_epochs=1), num_workers=1)
  try:
    got = list(it)
  finally:
    it.close()
  for a, b in zip(got, reference, strict=True):
    _assert_batches_equal(a, b)


def test_batches_become_sharded_global_arrays(world, tokenizer):
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  batch = _train(world, tokenizer, global_batch_size=8, grouped=False, num_epochs=1)[0]
  for k, v in batch.items():
    arr = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), v)
    assert arr.shape == v.shape and len(arr.addressable_shards) == 8, k
    np.testing.assert_array_equal(np.asarray(arr), v)
