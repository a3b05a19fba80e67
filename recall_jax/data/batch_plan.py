"""Per-epoch batch plans (pure numpy): plain shuffled batches, or micro-group batches for targeted refinement.

A plan is a pure function of its inputs: the same (keys, batch size, seed, epoch, processes) always gives the same
plan, on every process, so processes agree on the global batches without talking to each other.

Micro-group packing (`micro_group_plan`), in order:
1. Items sharing a group key form a micro-group (an original triplet and its corrective siblings); groups sharing a
   reference key form a reference block. Items of one group must share one reference (error otherwise).
2. Shuffle, from (seed, epoch): the order of blocks, of groups inside a block, of items inside a group.
3. A group larger than the batch is cut into batch-sized pieces (the last one smaller); every other group stays whole.
4. Packing units: a block that fits in a batch is one unit (its groups in consecutive slots); a larger block is cut
   at group boundaries into consecutive units that each fit (next-fit, in the shuffled order).
5. Units go into global batches by first-fit in the shuffled order: each unit into the earliest batch with room,
   a new batch when none has. First-fit rather than first-fit-decreasing: sorting by size would put all the big
   blocks in the same batches, while units are small next to a batch, so first-fit leaves little room unused.
6. Full batches come first (in the order they were opened); batches left with room that no later unit could fill
   come last, padded (item index -1, mask False). Only those tail batches carry padding.
Each process then takes its contiguous slice of every global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """One epoch of batches for one process; every array is (num_batches, local_batch_size).

  item_index: index of the item in the input lists, -1 for padding.
  group_id:   micro-group id (dense over the epoch, the same on every process), for the in-group triplet loss;
              -1 for padding. random_plan gives every item its own group.
  target_id:  equal for slots whose target is the same image (from `target_keys`), so in-batch duplicates can be
              masked as false negatives; -1 for padding. Without target keys every item has its own id.
  mask:       True for real items.
  """

  item_index: np.ndarray
  group_id: np.ndarray
  target_id: np.ndarray
  mask: np.ndarray
  global_batch_size: int
  num_processes: int
  process_index: int

  @property
  def num_batches(self) -> int:
    return self.item_index.shape[0]

  @property
  def local_batch_size(self) -> int:
    return self.item_index.shape[1]


def _rng(seed: int, epoch: int) -> np.random.Generator:
  if int(seed) < 0 or int(epoch) < 0:
    raise ValueError(f"seed and epoch must be >= 0, got seed={seed} epoch={epoch}")
  return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))


def _check_sizes(n: int, batch_size: int, num_processes: int, process_index: int) -> None:
  if n < 1:
    raise ValueError("a batch plan needs at least one item")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if num_processes < 1 or not 0 <= process_index < num_processes:
    raise ValueError(f"process_index {process_index} out of range for {num_processes} processes")
  if batch_size % num_processes:
    raise ValueError(f"global batch_size {batch_size} is not divisible by num_processes {num_processes}")


def _dense_ids(keys: Sequence[str]) -> np.ndarray:
  return np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)[1].astype(np.int32)


def _target_ids(target_keys: Optional[Sequence[str]], n: int) -> np.ndarray:
  if target_keys is None:
    return np.arange(n, dtype=np.int32)
  if len(target_keys) != n:
    raise ValueError(f"target_keys has {len(target_keys)} entries for {n} items")
  return _dense_ids(target_keys)


def _finish(batches: np.ndarray, group_of_item: np.ndarray, target_of_item: np.ndarray, batch_size: int,
            num_processes: int, process_index: int) -> BatchPlan:
  """Per-item ids looked up for the (num_batches, batch_size) global item table, then this process's slice."""
  local = batch_size // num_processes
  items = batches[:, process_index * local:(process_index + 1) * local]
  mask = items >= 0
  safe = np.where(mask, items, 0)
  return BatchPlan(
      item_index=items.astype(np.int32),
      group_id=np.where(mask, group_of_item[safe], -1).astype(np.int32),
      target_id=np.where(mask, target_of_item[safe], -1).astype(np.int32),
      mask=mask,
      global_batch_size=batch_size, num_processes=num_processes, process_index=process_index)


def random_plan(n: int, batch_size: int, seed: int, epoch: int, num_processes: int = 1, process_index: int = 0, *,
                target_keys: Optional[Sequence[str]] = None) -> BatchPlan:
  """Plain shuffled global batches of a permutation of range(n); the last batch padded."""
  _check_sizes(n, batch_size, num_processes, process_index)
  order = _rng(seed, epoch).permutation(n)
  num_batches = -(-n // batch_size)
  batches = np.full(num_batches * batch_size, -1, np.int64)
  batches[:n] = order
  return _finish(batches.reshape(num_batches, batch_size), np.arange(n, dtype=np.int32),
                 _target_ids(target_keys, n), batch_size, num_processes, process_index)


class _FirstFit:
  """First-fit bin choice in O(log bins): a max-tree over the room left in each bin (unopened bins are empty)."""

  def __init__(self, max_bins: int, capacity: int):
    self.size = 1
    while self.size < max_bins:
      self.size *= 2
    self.room = [capacity] * (2 * self.size)

  def place(self, need: int) -> int:
    node = 1
    while node < self.size:
      node = 2 * node if self.room[2 * node] >= need else 2 * node + 1
    self.room[node] -= need
    parent = node // 2
    while parent:
      self.room[parent] = max(self.room[2 * parent], self.room[2 * parent + 1])
      parent //= 2
    return node - self.size


def micro_group_plan(group_keys: Sequence[str], reference_keys: Sequence[str], batch_size: int, seed: int,
                     epoch: int, num_processes: int = 1, process_index: int = 0, *,
                     target_keys: Optional[Sequence[str]] = None) -> BatchPlan:
  """Micro-group batches (see the module docstring for the packing); item i has group_keys[i], reference_keys[i]."""
  n = len(group_keys)
  _check_sizes(n, batch_size, num_processes, process_index)
  if len(reference_keys) != n:
    raise ValueError(f"reference_keys has {len(reference_keys)} entries for {n} group keys")
  target_of_item = _target_ids(target_keys, n)

  # Groups and reference blocks, in order of first appearance (deterministic before shuffling).
  group_index: dict[str, int] = {}
  group_items: list[list[int]] = []
  group_ref: list[str] = []
  block_index: dict[str, int] = {}
  block_groups: list[list[int]] = []
  for i, (key, ref) in enumerate(zip(group_keys, reference_keys)):
    g = group_index.get(key)
    if g is None:
      g = group_index[key] = len(group_items)
      group_items.append([])
      group_ref.append(ref)
      b = block_index.setdefault(ref, len(block_groups))
      if b == len(block_groups):
        block_groups.append([])
      block_groups[b].append(g)
    elif group_ref[g] != ref:
      raise ValueError(f"item {i}: micro-group {key!r} has references {group_ref[g]!r} and {ref!r}; "
                       "a group must share one reference")
    group_items[g].append(i)
  group_of_item = np.empty(n, np.int32)
  for g, members in enumerate(group_items):
    group_of_item[members] = g

  # Shuffle, cut oversized groups, and form packing units (lists of item arrays, each unit <= batch_size).
  rng = _rng(seed, epoch)
  units: list[list[np.ndarray]] = []
  for b in rng.permutation(len(block_groups)):
    groups = block_groups[b]
    pieces = []
    for g in (groups[j] for j in rng.permutation(len(groups))):
      members = np.asarray(group_items[g])[rng.permutation(len(group_items[g]))]
      pieces.extend(members[s:s + batch_size] for s in range(0, len(members), batch_size))
    unit, size = [], 0
    for piece in pieces:
      if size + len(piece) > batch_size:
        units.append(unit)
        unit, size = [], 0
      unit.append(piece)
      size += len(piece)
    units.append(unit)

  # First-fit packing into global batches.
  packer = _FirstFit(len(units), batch_size)
  bins: list[list[np.ndarray]] = []
  for unit in units:
    k = packer.place(sum(len(p) for p in unit))
    if k == len(bins):
      bins.append([])
    bins[k].extend(unit)
  filled = [np.concatenate(b) for b in bins]
  order = sorted(range(len(filled)), key=lambda k: len(filled[k]) < batch_size)  # stable: full batches first
  batches = np.full((len(filled), batch_size), -1, np.int64)
  for row, k in enumerate(order):
    batches[row, :len(filled[k])] = filled[k]
  return _finish(batches, group_of_item, target_of_item, batch_size, num_processes, process_index)
