"""Grain input pipelines: records -> fixed-shape numpy batches of query and target examples.

Training: a per-epoch batch plan (micro-groups or plain shuffling, recall_jax.data.batch_plan) gives every slot of
every global batch its example; each process reads its own contiguous slice of every global batch. The epochs are
laid end to end in one `grain.MapDataset` of batches, so element i is local batch i of the run: the data are a pure
function of (seed, epoch, process), and the iterator's state (a position) is what Orbax saves with
`grain.checkpoint.CheckpointSave`.

Evaluation: the queries and the gallery of a CIRSplit as separate datasets of fixed-size batches, the last one
padded, with a validity mask and each slot's index into `split.queries` / `split.gallery`.

A batch is a dict of numpy arrays whose shapes depend only on the encoding config (B = the local batch size,
P = the largest bucket's patch count, L = a text length bucket):
  {query,target}_input_ids       int32 (B, L)      chat prompt, image pads expanded, padded to a length bucket
  {query,target}_attention_mask  int32 (B, L)
  {query,target}_pixel_values    float32 (B, P, C*T*14*14)  one image per example, zero rows past its grid
  {query,target}_image_grid_thw  int64 (B, 3)
  group_ids (int32, micro-group id, -1 on padding), target_ids (int32, one id per target image name, for masking
  in-batch duplicates of a target), example_index (int32 into the record list, -1 on padding), valid (bool),
  query_valid (bool: valid and the query is a loss row, i.e. not `Query.negative_only`).
With one image bucket and one length per side every batch has the same shapes, and with one image bucket
`pixel_values.reshape(-1, D)` is exactly what the Hugging Face processor returns for the batch's images.
Padding slots repeat a real example (so the model sees well-formed inputs) and are masked by `valid`.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import sys
import threading
from typing import Any, Callable, Mapping, Optional, Sequence

import grain
import jax
import numpy as np
from PIL import Image

from recall_jax.data import batch_plan
from recall_jax.data import prompts
from recall_jax.data.image import (MAX_PIXELS, MIN_PIXELS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageBuckets,
                                   load_image, preprocess_images)
from recall_jax.data.records import CIRSplit, DataError, Query

ImageLoader = Callable[[str], Image.Image]
Batch = dict[str, np.ndarray]


class FileImages:
  """Image name -> PIL RGB image read from its file (`CIRSplit.images`); errors name the image and the file."""

  def __init__(self, paths: Mapping[str, str]):
    self.paths = dict(paths)

  def __call__(self, name: str) -> Image.Image:
    if name not in self.paths:
      raise DataError(f"image {name!r} is not among the {len(self.paths)} images of the split")
    return load_image(self.paths[name])


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
  """How examples become arrays: static-shape buckets and the prompt protocol.

  In this package "encode" means only this: text and images -> model inputs (token ids, pixels, positions). What
  the model makes of them are embeddings (`eval.embeddings`, `Embedder.embed_*`).

  image_buckets:  image sizes (each image is resized to the bucket of nearest aspect ratio, then preprocessed).
  query_lengths:  text length buckets of query prompts; a batch is padded to the smallest one that fits it
                  (one value: every batch has the same shape).
  target_lengths: the same for target prompts.
  caption_join:   how FashionIQ's two captions are joined (prompts.query_instruction's protocol option).
  flip_captions:  training only: swap the order of the two captions with probability 1/2, per (seed, epoch, item).
  """

  image_buckets: ImageBuckets
  query_lengths: tuple[int, ...]
  target_lengths: tuple[int, ...]
  padding_side: str = "left"
  caption_join: str = "and"
  flip_captions: bool = False
  min_pixels: int = MIN_PIXELS
  max_pixels: int = MAX_PIXELS
  patch_size: int = 14
  merge_size: int = 2
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN  # the model family's image processor (models/family.py)
  image_std: tuple[float, ...] = OPENAI_CLIP_STD

  def __post_init__(self):
    if not self.query_lengths or not self.target_lengths:
      raise ValueError("EncodeConfig needs at least one query length and one target length bucket")
    if self.padding_side not in ("left", "right"):
      raise ValueError(f"EncodeConfig.padding_side must be 'left' or 'right', got {self.padding_side!r}")
    if self.caption_join not in prompts.CAPTION_JOINS:
      raise ValueError(f"EncodeConfig.caption_join must be one of {prompts.CAPTION_JOINS}, got {self.caption_join!r}")

  @property
  def max_patches(self) -> int:
    return max((h // self.patch_size) * (w // self.patch_size) for h, w in self.image_buckets.sizes)


def encode_images(images: Sequence[Image.Image], cfg: EncodeConfig) -> tuple[np.ndarray, np.ndarray]:
  """Images -> (pixel_values (B, P, D) zero-padded to the largest bucket, image_grid_thw (B, 3))."""
  rows, grids = [], []
  for image in images:
    resized = cfg.image_buckets.resize(image)
    pixels, grid = preprocess_images([resized], min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                     patch_size=cfg.patch_size, merge_size=cfg.merge_size,
                                     image_mean=cfg.image_mean, image_std=cfg.image_std)
    expected = cfg.image_buckets.grid((resized.height, resized.width), cfg.patch_size)
    if tuple(grid[0]) != expected:
      raise ValueError(f"bucket {(resized.height, resized.width)} is resized again by preprocessing "
                       f"(grid {tuple(grid[0])}, expected {expected}): check min_pixels / max_pixels")
    rows.append(pixels)
    grids.append(grid[0])
  pixel_values = np.zeros((len(rows), cfg.max_patches, rows[0].shape[1]), np.float32)
  for i, pixels in enumerate(rows):
    pixel_values[i, :len(pixels)] = pixels
  return pixel_values, np.stack(grids).astype(np.int64)


def encode_side(prefix: str, tokenizer: Any, texts: Sequence[str], image_names: Sequence[str], load: ImageLoader,
                lengths: Sequence[int], cfg: EncodeConfig) -> Batch:
  """One side (query or target) of a batch: prompts with one image each -> the four `<prefix>_*` arrays."""
  # Micro-groups share references and padding repeats examples: decode each distinct image once.
  distinct = list(dict.fromkeys(image_names))
  pixels, grids = encode_images([load(name) for name in distinct], cfg)
  rows = [distinct.index(name) for name in image_names]
  pixel_values, grids = pixels[rows], grids[rows]
  token_counts = [[int(np.prod(g)) // cfg.merge_size**2] for g in grids]
  tokens = prompts.tokenize_batch(tokenizer, list(texts), token_counts, tuple(lengths), padding_side=cfg.padding_side)
  return {
      f"{prefix}_input_ids": np.asarray(tokens["input_ids"], np.int32),
      f"{prefix}_attention_mask": np.asarray(tokens["attention_mask"], np.int32),
      f"{prefix}_pixel_values": pixel_values,
      f"{prefix}_image_grid_thw": grids,
  }


def query_text(dataset: str, query: Query, cfg: EncodeConfig, flip: bool = False) -> str:
  """The query's embedding prompt; `flip` reverses the captions' order (a training augmentation)."""
  captions = tuple(reversed(query.captions)) if flip else query.captions
  return prompts.query_prompt(dataset, captions, query.category, caption_join=cfg.caption_join)


def process_position(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is outside [0, process_count={count})")
  return index, count


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the process count "
                     f"{process_count}")
  return global_batch_size // process_count


# ----------------------------------------------------------------------------------------------- training


class EpochBatches:
  """Random-access sequence of local batch plans, epochs laid end to end: element i -> (epoch, slot arrays).

  Epochs may differ in their number of batches (group packing depends on the shuffle), so the start of each epoch
  is found by computing the plans of the epochs before it; plans are cheap and the latest few are cached.
  Thread-safe (Grain reads with several threads); picklable (worker processes rebuild the cache).
  """

  _CACHED_PLANS = 4

  def __init__(self, plan_fn: Callable[[int], dict[str, np.ndarray]], num_epochs: Optional[int]):
    self.plan_fn = plan_fn
    self.num_epochs = num_epochs
    self._init_cache([0])

  def _init_cache(self, starts: list[int]) -> None:
    self._starts = starts  # self._starts[e] = index of epoch e's first batch, for every epoch planned so far.
    self._plans: collections.OrderedDict[int, dict[str, np.ndarray]] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    return {"plan_fn": self.plan_fn, "num_epochs": self.num_epochs, "starts": list(self._starts)}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.plan_fn, self.num_epochs = state["plan_fn"], state["num_epochs"]
    self._init_cache(state["starts"])

  def _plan(self, epoch: int) -> dict[str, np.ndarray]:
    if epoch not in self._plans:
      self._plans[epoch] = self.plan_fn(epoch)
      while len(self._plans) > self._CACHED_PLANS:
        self._plans.popitem(last=False)
    return self._plans[epoch]

  def _extend_to(self, epoch: int) -> None:
    while len(self._starts) <= epoch:
      last = len(self._starts) - 1
      num_batches = len(self._plan(last)["index"])
      if num_batches == 0:
        raise ValueError(f"the batch plan of epoch {last} has no batches")
      self._starts.append(self._starts[-1] + num_batches)

  def __len__(self) -> int:
    if self.num_epochs is None:
      return sys.maxsize
    with self._lock:
      self._extend_to(self.num_epochs)
      return self._starts[self.num_epochs]

  def __getitem__(self, i: int) -> dict[str, Any]:
    if i < 0 or i >= len(self):
      raise IndexError(f"batch {i} is outside the {self.num_epochs} planned epochs")
    with self._lock:
      while self._starts[-1] <= i:
        self._extend_to(len(self._starts))
      epoch = bisect.bisect_right(self._starts, i) - 1
      plan = self._plan(epoch)
      b = i - self._starts[epoch]
    return {"epoch": epoch, **{k: v[b] for k, v in plan.items()}}


class _TrainBatchEncoder:
  """Local batch plan -> batch dict; a picklable callable so Grain worker processes can run it."""

  def __init__(self, queries: Sequence[Query], dataset: str, load: ImageLoader, tokenizer: Any, cfg: EncodeConfig,
               seed: int):
    self.queries = tuple(queries)
    self.dataset = dataset
    self.load = load
    self.tokenizer = tokenizer
    self.cfg = cfg
    self.seed = seed

  def __call__(self, slots: dict[str, Any]) -> Batch:
    index = np.asarray(slots["index"])
    valid = index >= 0
    # Padding slots repeat an example of the batch (or the first example when the whole local slice is padding).
    fill = int(index[valid][0]) if valid.any() else 0
    items = [int(i) if i >= 0 else fill for i in index]
    queries = [self.queries[i] for i in items]
    flips = [self._flip(slots["epoch"], i) for i in items]
    query_texts = [query_text(self.dataset, q, self.cfg, f) for q, f in zip(queries, flips)]
    target_texts = [prompts.target_prompt()] * len(items)
    batch = encode_side("query", self.tokenizer, query_texts, [q.reference for q in queries], self.load,
                        self.cfg.query_lengths, self.cfg)
    batch.update(encode_side("target", self.tokenizer, target_texts, [q.target for q in queries], self.load,
                             self.cfg.target_lengths, self.cfg))
    batch["group_ids"] = np.where(valid, slots["group_ids"], -1).astype(np.int32)
    batch["target_ids"] = np.where(valid, slots["target_ids"], -1).astype(np.int32)
    batch["example_index"] = index.astype(np.int32)
    batch["valid"] = valid
    batch["query_valid"] = valid & ~np.asarray([q.negative_only for q in queries], bool)
    return batch

  def _flip(self, epoch: int, item: int) -> bool:
    if not self.cfg.flip_captions:
      return False
    return bool(np.random.default_rng([self.seed, epoch, item]).integers(2))


def train_dataset(
    queries: Sequence[Query],
    *,
    dataset: str,
    load: ImageLoader,
    tokenizer: Any,
    cfg: EncodeConfig,
    global_batch_size: int,
    seed: int,
    grouped: bool = True,
    num_epochs: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> grain.MapDataset:
  """This process's training batches, epochs 0, 1, ... end to end (forever when num_epochs is None).

  queries: training triplets (every one needs a target); dataset: "fashioniq" | "cirr" | "circo" (picks the
  prompt); load: image name -> PIL image (FileImages, or tfds_builders.ImageRecords); grouped: micro-group batch
  plan (batch_plan.micro_group_plan, groups keyed by Query.group_key) instead of plain shuffling.
  """
  if not queries:
    raise ValueError("train_dataset needs at least one query")
  for q in queries:
    if q.target is None:
      raise DataError(f"training query {q.qid!r} ({q.source}) has no target")
  index, count = process_position(process_index, process_count)
  local_batch_size(global_batch_size, count)
  group_keys = [q.group_key for q in queries]
  reference_keys = [q.reference for q in queries]
  target_keys = [q.target for q in queries]

  def plan(epoch: int) -> dict[str, np.ndarray]:
    if grouped:
      p = batch_plan.micro_group_plan(group_keys, reference_keys, global_batch_size, seed, epoch,
                                      num_processes=count, process_index=index, target_keys=target_keys)
    else:
      p = batch_plan.random_plan(len(queries), global_batch_size, seed, epoch, num_processes=count,
                                 process_index=index, target_keys=target_keys)
    return {"index": p.item_index, "group_ids": p.group_id, "target_ids": p.target_id}

  encoder = _TrainBatchEncoder(queries, dataset, load, tokenizer, cfg, seed)
  return grain.MapDataset.source(EpochBatches(plan, num_epochs)).map(encoder)


def make_iterator(ds: grain.MapDataset, *, num_threads: int = 1, prefetch: int = 2,
                  num_workers: int = 0) -> grain.DatasetIterator:
  """A checkpointable iterator over `ds` (get_state / set_state; grain.checkpoint for Orbax).

  num_workers > 0 decodes batches in that many worker processes (needs a `__main__` guard and parsed absl
  flags in the main program); the batches and the iterator states are the same as with 0 workers.
  """
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it_ds)


# --------------------------------------------------------------------------------------------- evaluation


def _eval_slots(n: int, global_batch_size: int, index: int, count: int) -> list[np.ndarray]:
  """Each global batch's slice for this process: item indices, -1 past the end."""
  local = local_batch_size(global_batch_size, count)
  num_batches = -(-n // global_batch_size)
  padded = np.full(num_batches * global_batch_size, -1, np.int64)
  padded[:n] = np.arange(n)
  batches = padded.reshape(num_batches, count, local)[:, index]
  return list(batches)


class _EvalBatchEncoder:
  """Item indices -> one side's arrays plus `index` and `valid`; picklable."""

  def __init__(self, prefix: str, texts: Sequence[str], names: Sequence[str], load: ImageLoader, tokenizer: Any,
               lengths: Sequence[int], cfg: EncodeConfig):
    self.prefix = prefix
    self.texts = tuple(texts)
    self.names = tuple(names)
    self.load = load
    self.tokenizer = tokenizer
    self.lengths = tuple(lengths)
    self.cfg = cfg

  def __call__(self, index: np.ndarray) -> Batch:
    valid = index >= 0
    fill = int(index[valid][0]) if valid.any() else 0
    items = [int(i) if i >= 0 else fill for i in index]
    batch = encode_side(self.prefix, self.tokenizer, [self.texts[i] for i in items],
                        [self.names[i] for i in items], self.load, self.lengths, self.cfg)
    batch["index"] = index.astype(np.int32)
    batch["valid"] = valid
    return batch


def eval_query_dataset(split: CIRSplit, *, load: ImageLoader, tokenizer: Any, cfg: EncodeConfig,
                       global_batch_size: int, process_index: Optional[int] = None,
                       process_count: Optional[int] = None) -> grain.MapDataset:
  """Batches of the split's queries (`query_*` arrays, `index` into split.queries, `valid`); no caption flips."""
  index, count = process_position(process_index, process_count)
  texts = [query_text(split.dataset, q, cfg) for q in split.queries]
  encoder = _EvalBatchEncoder("query", texts, [q.reference for q in split.queries], load, tokenizer,
                              cfg.query_lengths, cfg)
  return grain.MapDataset.source(_eval_slots(len(split.queries), global_batch_size, index, count)).map(encoder)


def eval_gallery_dataset(split: CIRSplit, *, load: ImageLoader, tokenizer: Any, cfg: EncodeConfig,
                         global_batch_size: int, process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> grain.MapDataset:
  """Batches of the split's gallery images as targets (`target_*` arrays, `index` into split.gallery, `valid`)."""
  index, count = process_position(process_index, process_count)
  texts = [prompts.target_prompt()] * len(split.gallery)
  encoder = _EvalBatchEncoder("target", texts, split.gallery, load, tokenizer, cfg.target_lengths, cfg)
  return grain.MapDataset.source(_eval_slots(len(split.gallery), global_batch_size, index, count)).map(encoder)
