"""Batch plans: micro-groups kept whole, same-reference groups adjacent, exact epoch coverage, purity, padding."""

import collections

import numpy as np
import pytest

from recall_jax.data.batch_plan import micro_group_plan, random_plan

BATCH = 12


def _world(seed=0, num_refs=40, big_group=30):
  """Items with shuffled input order: 1-3 groups per reference, 1-6 items per group, plus one group > BATCH."""
  rng = np.random.default_rng(seed)
  items = []
  for ref in range(num_refs):
    for grp in range(rng.integers(1, 4)):
      items += [(f"r{ref}|t{grp}", f"r{ref}", f"img{rng.integers(0, 50)}")] * int(rng.integers(1, 7))
  items += [("big|t", "big", f"img{i}") for i in range(big_group)]
  items = [items[i] for i in rng.permutation(len(items))]
  groups, refs, targets = (list(x) for x in zip(*items))
  return groups, refs, targets


def _global(groups, refs, targets, procs=1, seed=3, epoch=0, batch=BATCH):
  plans = [micro_group_plan(groups, refs, batch, seed, epoch, procs, p, target_keys=targets) for p in range(procs)]
  cat = lambda name: np.concatenate([getattr(p, name) for p in plans], axis=1)
  return plans, cat("item_index"), cat("group_id"), cat("target_id"), cat("mask")


def _members(keys):
  out = collections.defaultdict(list)
  for i, k in enumerate(keys):
    out[k].append(i)
  return out


@pytest.mark.parametrize("procs", [1, 2, 4])
def test_each_item_exactly_once_across_processes(procs):
  groups, refs, targets = _world()
  plans, items, _, _, mask = _global(groups, refs, targets, procs)
  assert all(p.local_batch_size == BATCH // procs for p in plans)
  np.testing.assert_array_equal(np.sort(items[mask]), np.arange(len(groups)))
  assert (items[~mask] == -1).all()


def test_groups_that_fit_stay_in_one_batch_and_in_consecutive_slots():
  groups, refs, targets = _world()
  _, items, _, _, _ = _global(groups, refs, targets, procs=2)
  where = {int(i): (b, s) for (b, s), i in np.ndenumerate(items) if i >= 0}
  for key, members in _members(groups).items():
    if len(members) > BATCH:
      continue
    batches = {where[i][0] for i in members}
    assert len(batches) == 1, key
    slots = sorted(where[i][1] for i in members)
    assert slots == list(range(slots[0], slots[0] + len(slots))), key


def test_same_reference_groups_are_adjacent():
  groups, refs, targets = _world()
  _, items, _, _, _ = _global(groups, refs, targets)
  where = {int(i): (b, s) for (b, s), i in np.ndenumerate(items) if i >= 0}
  checked = 0
  for ref, members in _members(refs).items():
    if len(members) > BATCH:
      continue
    checked += 1
    assert len({where[i][0] for i in members}) == 1, ref
    slots = sorted(where[i][1] for i in members)
    assert slots == list(range(slots[0], slots[0] + len(slots))), ref
  assert checked > 20


def test_oversized_group_is_cut_into_batch_sized_pieces():
  groups, refs, targets = _world(big_group=30)
  _, items, group_id, _, _ = _global(groups, refs, targets)
  big = set(_members(groups)["big|t"])
  per_batch = sorted((np.isin(items, list(big))).sum(1).tolist(), reverse=True)
  assert per_batch[:3] == [12, 12, 6] and sum(per_batch) == 30
  # the pieces keep one group id
  assert len(set(group_id[np.isin(items, list(big))].tolist())) == 1


def test_ids_follow_keys_and_padding_is_masked():
  groups, refs, targets = _world()
  plans, items, group_id, target_id, mask = _global(groups, refs, targets, procs=2)
  real = items[mask]
  gid, tid = group_id[mask], target_id[mask]
  for a in range(0, len(real), 7):
    for b in range(len(real)):
      assert (gid[a] == gid[b]) == (groups[real[a]] == groups[real[b]])
      assert (tid[a] == tid[b]) == (targets[real[a]] == targets[real[b]])
  assert (group_id[~mask] == -1).all() and (target_id[~mask] == -1).all()
  # padding only in the tail batches, and little of it
  padded_rows = np.nonzero((~mask).any(1))[0]
  assert padded_rows.tolist() == list(range(items.shape[0] - len(padded_rows), items.shape[0]))
  assert (~mask).sum() < 2 * BATCH


def test_without_target_keys_every_item_is_its_own_target():
  groups, refs, _ = _world()
  plan = micro_group_plan(groups, refs, BATCH, 0, 0)
  np.testing.assert_array_equal(plan.target_id[plan.mask], plan.item_index[plan.mask])


def test_pure_function_of_seed_and_epoch():
  groups, refs, targets = _world()
  a = _global(groups, refs, targets, epoch=1)[1]
  b = _global(list(groups), list(refs), list(targets), epoch=1)[1]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, _global(groups, refs, targets, epoch=2)[1])
  assert not np.array_equal(a, _global(groups, refs, targets, seed=4, epoch=1)[1])


def test_errors_name_the_problem():
  groups, refs, targets = _world()
  with pytest.raises(ValueError, match="not divisible by num_processes 5"):
    micro_group_plan(groups, refs, BATCH, 0, 0, num_processes=5)
  with pytest.raises(ValueError, match="must share one reference"):
    micro_group_plan(["g", "g"], ["a", "b"], 4, 0, 0)
  with pytest.raises(ValueError, match="reference_keys has 1 entries"):
    micro_group_plan(["g", "g"], ["a"], 4, 0, 0)
  with pytest.raises(ValueError, match="process_index 2 out of range"):
    random_plan(10, 4, 0, 0, num_processes=2, process_index=2)


def test_random_plan_covers_epoch_once_and_pads_last_batch():
  n, procs = 50, 4
  plans = [random_plan(n, 8, 7, 0, procs, p, target_keys=[f"t{i % 9}" for i in range(n)]) for p in range(procs)]
  items = np.concatenate([p.item_index for p in plans], axis=1)
  mask = np.concatenate([p.mask for p in plans], axis=1)
  assert items.shape == (7, 8)
  np.testing.assert_array_equal(np.sort(items[mask]), np.arange(n))
  assert mask[:-1].all() and mask[-1].sum() == 2
  target_id = np.concatenate([p.target_id for p in plans], axis=1)
  np.testing.assert_array_equal(target_id[mask] == target_id[mask][0], items[mask] % 9 == items[mask][0] % 9)
  group_id = np.concatenate([p.group_id for p in plans], axis=1)
  np.testing.assert_array_equal(group_id[mask], items[mask])
  again = np.concatenate([random_plan(n, 8, 7, 0, procs, p).item_index for p in range(procs)], axis=1)
  np.testing.assert_array_equal(items, again)
  assert not np.array_equal(items, np.concatenate([random_plan(n, 8, 7, 1, procs, p).item_index
                                                    for p in range(procs)], axis=1))
