"""Stage 2: the selection rule on hand-made rankings, ranks with ties and the reference removed, the ablation
strategies, and the stage end to end on the tiny world (counts, invariants, resume)."""

import collections
import json
import os

import numpy as np
import pytest

from configs import tiny as demo
from recall_jax import main
from recall_jax.stages import artifacts, mine

ROW = [7, 3, 9, 5, 1, 8, 2, 6, 4, 0, 10, 11]  # a ranking, best first


@pytest.mark.parametrize("gt,ref,top_k,cap,want", [
    (7, -1, 10, 5, []),  # ground truth first: not a failure
    (5, -1, 10, 5, [7, 3, 9]),  # ground truth 4th: the 3 above it
    (5, -1, 10, 2, [7, 3]),  # ... capped
    (11, -1, 10, 5, [7, 3, 9, 5, 1]),  # outside the top-10: the top-k, capped
    (11, -1, 3, 5, [7, 3, 9]),  # top-k smaller than the cap
    (0, -1, 10, 20, [7, 3, 9, 5, 1, 8, 2, 6, 4]),  # 10th: the 9 above it
    (5, 3, 10, 5, [7, 9]),  # the reference is removed before choosing, never an instance
    (9, 7, 10, 5, [3]),  # the reference ranked first: the ground truth is 2nd without it
    (3, 7, 10, 5, []),  # ... or first
    (10, 7, 10, 20, [3, 9, 5, 1, 8, 2, 6, 4, 0]),  # reference removal pulls the ground truth into the top-10
])
def test_select_instances(gt, ref, top_k, cap, want):
  assert mine.select_instances(ROW, gt, ref, top_k, cap) == want


def test_select_instances_ground_truth_missing_from_a_short_row():
  assert mine.select_instances(ROW[:4], 11, -1, 3, 5) == [7, 3, 9]


def test_select_instances_bad_config():
  with pytest.raises(ValueError, match="mine.max_per_query"):
    mine.select_instances(ROW, 5, -1, 10, 0)


def test_ranks_match_a_stable_argsort_with_the_reference_removed():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(9, 8)).astype(np.float32)
  g = rng.normal(size=(30, 8)).astype(np.float32)
  g[5] = g[2]  # exact ties: gallery order decides
  g[17] = g[2]
  exclude = rng.integers(0, 30, size=9).astype(np.int32)
  probes = rng.integers(-1, 30, size=(9, 3)).astype(np.int32)
  probes[:, 0] = [2, 5, 17, 2, 5, 17, 0, 1, 3]
  indices, _, ranks, scores = mine.rank_probes(q, g, exclude, probes, top_k=6, chunk_size=4)
  sims = q @ g.T
  for i in range(9):
    order = [j for j in np.lexsort((np.arange(30), -sims[i])) if j != exclude[i]]
    assert indices[i].tolist() == order[:6]
    for p, r, s in zip(probes[i], ranks[i], scores[i]):
      if p < 0:
        assert r == -1
      elif p != exclude[i]:
        assert r == order.index(p) + 1
        np.testing.assert_allclose(s, sims[i, p], rtol=0, atol=1e-5 * np.abs(sims).max())  # sims cross 0
    # Tied images rank by gallery index, next to each other: 2 before 5 before 17 (less the excluded one).
    tied = [order.index(j) for j in (2, 5, 17) if j != exclude[i]]
    assert np.all(np.diff(tied) == 1)


def test_tie_with_an_earlier_image_is_a_failure():
  q = np.asarray([[1.0, 0.0]], np.float32)
  g = np.asarray([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]], np.float32)  # 1 and 2 tie
  topk, _, gt_rank, _ = mine.rank_probes(q, g, np.asarray([0], np.int32), np.asarray([[2]], np.int32), top_k=3)
  assert gt_rank[0, 0] == 2
  assert mine.select_instances(topk[0], 2, 0, 10, 5) == [1]
  assert mine.select_instances(topk[0], 1, 0, 10, 5) == []


def test_strategies():
  topk = np.asarray([[4, 2, 7, 1], [3, 0, 5, 6], [9, 8, 1, 2]])  # reference already removed
  refs, gts = np.asarray([0, 1, 3]), np.asarray([7, 3, 5])
  guided = mine.choose("self_guided", topk, refs, gts, top_k=4, cap=5, seed=0)
  assert guided == [[4, 2], [], [9, 8, 1, 2]]
  hard = mine.choose("hard_negative", topk, refs, gts, top_k=4, cap=3, seed=0)
  assert hard == [[4, 2, 1], [0, 5, 6], [9, 8, 1]]
  random = mine.choose("random", topk, refs, gts, top_k=4, cap=5, seed=0)
  assert [len(c) for c in random] == [2, 0, 4]
  for c, r, g in zip(random, refs, gts):
    assert r not in c and g not in c and len(set(c)) == len(c)
  assert random == mine.choose("random", topk, refs, gts, top_k=4, cap=5, seed=0)
  assert random != mine.choose("random", topk, refs, gts, top_k=4, cap=5, seed=1)
  with pytest.raises(ValueError, match="mine.strategy"):
    mine.choose("hardest", topk, refs, gts, top_k=4, cap=5, seed=0)


def test_random_mining_draws_from_the_top_pool():
  """Table 3's random mining: only failing queries, self-guided's count, from the ranking's first `random_pool`."""
  rng = np.random.default_rng(0)
  ranked = np.stack([rng.permutation(np.arange(1, 200))[:60] for _ in range(40)])  # gallery of 200, 0 = reference
  refs = np.zeros(40, np.int64)
  gts = np.asarray([row[k % 12] for k, row in enumerate(ranked)])  # GT ranked 1st .. 12th
  guided = mine.choose("self_guided", ranked, refs, gts, top_k=10, cap=3, seed=0)
  for pool in (5, 50):
    drawn = mine.choose("random", ranked, refs, gts, top_k=10, cap=3, seed=0, random_pool=pool)
    assert [len(d) for d in drawn] == [len(g) for g in guided]
    assert sum(len(d) for d in drawn) > 0 and not drawn[0]  # the GT-first query draws nothing
    for d, row, r, g in zip(drawn, ranked, refs, gts):
      assert set(d) <= set(row[:pool].tolist()) and r not in d and g not in d and len(set(d)) == len(d)
  # A wider pool reaches past the self-guided head: the draws are not just the top-k again.
  wide = mine.choose("random", ranked, refs, gts, top_k=10, cap=3, seed=0, random_pool=50)
  assert any(not set(d) <= set(row[:10].tolist()) for d, row in zip(wide, ranked))
  with pytest.raises(ValueError, match="mine.random_pool"):
    mine.choose("random", ranked, refs, gts, top_k=10, cap=3, seed=0, random_pool=0)


def _config(strategy="self_guided"):
  cfg = demo.get_config()
  cfg.world.scale = "tiny"
  cfg.world.image_size = 56
  cfg.data.image_buckets = 56
  cfg.mine.strategy = strategy
  cfg.mine.max_per_query = 3
  cfg.mine.top_k = 5
  cfg.mine.sheet_queries = 3
  return cfg


def test_mine_end_to_end_then_resume(tmp_path):
  workdir = str(tmp_path / "run")
  cfg = _config()
  manifest = main.run(cfg, workdir, ["prepare", "mine"])["mine"]
  path = os.path.join(workdir, "mine", mine.MINED)
  records = artifacts.read_jsonl(path)
  assert os.path.getsize(os.path.join(workdir, "mine", mine.SHEET)) > 1000
  assert manifest["instances"] == len(records) > 0
  assert set(manifest["splits"]) == {"fashioniq_dress", "fashioniq_shirt", "fashioniq_toptee"}
  assert manifest["queries"] == sum(s["queries"] for s in manifest["splits"].values()) == 18
  assert len({r["id"] for r in records}) == len(records)

  by_query = collections.defaultdict(list)
  for r in records:
    by_query[r["qid"]].append(r)
    assert r["instance"] not in (r["reference"], *r["targets"])
    assert r["instance"].startswith(r["category"])  # mined from its own category's pool
    assert r["group"] == f"{r['reference']}\x1f{' / '.join(r['captions'])}"
    assert r["text"] == " and ".join(r["captions"])
    assert r["gt_rank"] > 1 and r["instance_similarity"] >= r["gt_similarity"]
  assert manifest["failures"] >= len(by_query)
  for rs in by_query.values():
    gt_rank = rs[0]["gt_rank"]
    # With the reference removed the instances are exactly the first ranks (above the GT when inside the top-k).
    expected = min(gt_rank - 1 if gt_rank <= cfg.mine.top_k else cfg.mine.top_k, cfg.mine.max_per_query)
    assert [r["instance_rank"] for r in rs] == list(range(1, expected + 1))
  assert manifest["instances_per_failing_query"] == pytest.approx(len(records) / manifest["failures"])

  # Resume: the manifest exists, nothing is redone.
  before = os.stat(path).st_mtime_ns
  assert main.run(cfg, workdir, ["prepare", "mine"])["mine"]["instances"] == len(records)
  assert os.stat(path).st_mtime_ns == before

  # The random ablation on the same world: same counts per query, never the reference or the ground truth.
  random_dir = str(tmp_path / "random")
  os.makedirs(random_dir)
  os.symlink(os.path.join(workdir, "prepare"), os.path.join(random_dir, "prepare"))
  rand = main.run(_config("random"), random_dir, ["mine"])["mine"]
  rand_records = artifacts.read_jsonl(os.path.join(random_dir, "mine", mine.MINED))
  assert rand["failures"] == manifest["failures"] and rand["instances"] == len(records)
  assert collections.Counter(r["qid"] for r in rand_records) == collections.Counter(r["qid"] for r in records)
  for r in rand_records:
    assert r["instance"] not in (r["reference"], *r["targets"]) and 1 <= r["instance_rank"] <= cfg.mine.random_pool
  assert json.load(open(os.path.join(random_dir, "mine", "manifest.json")))["strategy"] == "random"
