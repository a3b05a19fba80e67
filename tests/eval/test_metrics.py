"""Metrics against a direct Python computation from the ranked-list files, per dataset protocol."""

import json

import numpy as np
import pytest

from recall_jax.eval import metrics, retrieval, submission


def _reference_rankings(split, q_emb, g_emb, protocol, ref_order):
  """Per query: full ranked names and ranked subset names, from Python sorting only."""
  names = list(split.gallery)
  full, subsets = [], []
  for i, q in enumerate(split.queries):
    drop = {names.index(q.reference)} if protocol["exclude_reference"] and q.reference in names else set()
    full.append([names[j] for j in ref_order(q_emb, g_emb, i, [j for j in range(len(names)) if j not in drop])])
    members = [names.index(m) for m in q.subset if names.index(m) not in drop]
    subsets.append([names[j] for j in ref_order(q_emb, g_emb, i, members)])
  return full, subsets


def _recall(lists, split, k):
  hits = 0
  for ranked, q in zip(lists, split.queries):
    hits += any(t in ranked[:k] for t in q.targets)
  return 100.0 * hits / len(lists)


def _ap(ranked, gts, k):
  total, found = 0.0, 0
  for i, name in enumerate(ranked[:k]):
    if name in gts:
      found += 1
      total += found / (i + 1)
  return total / min(len(gts), k)


def _check_file_matches(path, full, subsets, split):
  with open(path) as f:
    data = json.load(f)
  assert [e["qid"] for e in data["queries"]] == [q.qid for q in split.queries]
  for e, ranked, sub in zip(data["queries"], full, subsets):
    assert e["top"] == ranked[:50]
    if split.dataset == "cirr":
      assert e["subset_top"] == sub[:3]
  return data


@pytest.mark.parametrize("exclude", [True, False])
def test_cirr_metrics_match_direct_computation(make_split, ref_order, tmp_path, exclude):
  split, q_emb, g_emb = make_split("cirr", num_q=60, num_g=80, seed=1)
  protocol = dict(retrieval.default_protocol("cirr"), exclude_reference=exclude)
  ranking = retrieval.rank_split(split, q_emb, g_emb, protocol)
  got = retrieval.split_metrics(split, ranking, protocol)
  full, subsets = _reference_rankings(split, q_emb, g_emb, protocol, ref_order)
  path = submission.write_ranked_lists(str(tmp_path / "ranked.json"), split, ranking, protocol)
  data = _check_file_matches(path, full, subsets, split)
  assert data["protocol"]["exclude_reference"] is exclude
  lists = [e["top"] for e in data["queries"]]
  subs = [e["subset_top"] for e in data["queries"]]
  expect = {f"R@{k}": _recall(lists, split, k) for k in (1, 5, 10, 50)}
  expect.update({f"Rsubset@{k}": _recall(subs, split, k) for k in (1, 2, 3)})
  expect["Avg"] = (expect["R@5"] + expect["Rsubset@1"]) / 2
  assert got.keys() == expect.keys()
  for key in expect:
    assert got[key] == pytest.approx(expect[key], abs=1e-9), key
  assert 0 < got["R@10"] < 100 and 0 < got["Rsubset@1"] < 100  # the metrics are informative on this data
  # the subset never offers the reference under exclusion
  if exclude:
    assert all(q.reference not in s for q, s in zip(split.queries, subs))


def test_fashioniq_per_category_and_summary(make_split, ref_order):
  per_cat = {}
  for seed, cat in enumerate(("dress", "shirt", "toptee")):
    split, q_emb, g_emb = make_split("fashioniq", num_q=40, num_g=70, seed=10 + seed, category=cat)
    protocol = retrieval.default_protocol("fashioniq")
    result = retrieval.evaluate_split(split, q_emb, g_emb, protocol)
    full, _ = _reference_rankings(split, q_emb, g_emb, protocol, ref_order)
    assert list(result["metrics"]) == ["R@1", "R@5", "R@10", "R@50"]
    for k in (1, 5, 10, 50):
      assert result["metrics"][f"R@{k}"] == pytest.approx(_recall(full, split, k), abs=1e-9)
    assert result["protocol"]["caption_join"] == "and" and result["category"] == cat
    per_cat[cat] = result["metrics"]
  summary = metrics.fashioniq_summary(per_cat)
  mean = {k: sum(m[f"R@{k}"] for m in per_cat.values()) / 3 for k in (1, 5, 10, 50)}
  assert summary == pytest.approx({**{f"mean_R@{k}": v for k, v in mean.items()},
                                   "avg": (mean[10] + mean[50]) / 2})


def test_circo_map_with_several_ground_truths(make_split, ref_order):
  split, q_emb, g_emb = make_split("circo", num_q=50, num_g=90, seed=5, num_gt=6)
  assert max(len(q.targets) for q in split.queries) > 3
  q_emb[0] = 1
  ref0 = split.gallery.index(split.queries[0].reference)
  g_emb[ref0] = 3  # scores 18, above any other item (at most 12): the best match of query 0 is its own reference
  protocol = retrieval.default_protocol("circo")
  result = retrieval.evaluate_split(split, q_emb, g_emb, protocol)
  full, _ = _reference_rankings(split, q_emb, g_emb, protocol, ref_order)
  assert full[0][0] == split.queries[0].reference  # CIRCO keeps the reference
  assert retrieval.rank_split(split, q_emb, g_emb, protocol).indices[0, 0] == ref0
  for k in (5, 10, 25, 50):
    expect = 100.0 * np.mean([_ap(r, set(q.targets), k) for r, q in zip(full, split.queries)])
    assert result["metrics"][f"mAP@{k}"] == pytest.approx(expect, abs=1e-9)
  for k in (1, 5, 10, 50):  # any ground truth in the top k
    assert result["metrics"][f"R@{k}"] == pytest.approx(_recall(full, split, k), abs=1e-9)


def test_map_and_recall_on_a_hand_made_ranking():
  ranking = np.array([[3, 1, 4, 0], [2, 0, 1, 3]])
  targets = [[1, 0], [5]]
  # query 0: hits at ranks 2 and 4 -> AP@4 = (1/2 + 2/4) / 2; AP@1 = 0; query 1: no hit
  assert metrics.map_at_k(ranking, targets, [1, 4]) == pytest.approx({"mAP@1": 0.0, "mAP@4": 25.0})
  assert metrics.recall_at_k(ranking, targets, [1, 2]) == {"R@1": 0.0, "R@2": 50.0}
  with pytest.raises(ValueError, match="k=5 needs a ranking of at least k"):
    metrics.recall_at_k(ranking, targets, [5])
  assert metrics.recall_at_k(ranking, targets, [5], complete=True) == {"R@5": 50.0}
  with pytest.raises(ValueError, match="query 1 has no ground truth"):
    metrics.recall_at_k(ranking, [[1], []], [1])


def test_small_gallery_ranking_is_complete(make_split):
  split, q_emb, g_emb = make_split("cirr", num_q=10, num_g=20, seed=2)
  protocol = retrieval.default_protocol("cirr")
  ranking = retrieval.rank_split(split, q_emb, g_emb, protocol)
  assert ranking.indices.shape == (10, 19)
  assert retrieval.split_metrics(split, ranking, protocol)["R@50"] == 100.0


def test_protocol_and_split_errors(make_split):
  split, q_emb, g_emb = make_split("cirr", num_q=5, num_g=20, seed=3)
  bad = retrieval.default_protocol("cirr")
  del bad["exclude_reference"]
  with pytest.raises(ValueError, match=r"missing keys \['exclude_reference'\]"):
    retrieval.evaluate_split(split, q_emb, g_emb, bad)
  with pytest.raises(ValueError, match=r"unknown keys \['caption_join'\]"):
    retrieval.evaluate_split(split, q_emb, g_emb, dict(retrieval.default_protocol("cirr"), caption_join="and"))
  with pytest.raises(ValueError, match="5 query / 19 gallery"):
    retrieval.evaluate_split(split, q_emb, g_emb[:19], retrieval.default_protocol("cirr"))
  test_split, q_emb, g_emb = make_split("cirr", num_q=5, num_g=20, seed=3, with_targets=False)
  with pytest.raises(ValueError, match="test.json#0: no ground truth"):
    retrieval.evaluate_split(test_split, q_emb, g_emb, retrieval.default_protocol("cirr"))


def test_first_hit_ranks_agree_with_recall():
  ranking = np.array([[3, 1, 4, 0], [2, 0, 1, 3], [7, 8, 9, 6]])
  targets = [[1, 0], [2], [5]]
  ranks = metrics.first_hit_ranks(ranking, targets)
  assert ranks.tolist() == [2, 1, 0]  # 0: the ground truth is not in the ranking at all
  for k in (1, 2, 4):
    assert metrics.recall_at_k(ranking, targets, [k])[f"R@{k}"] == pytest.approx(
        100 * np.mean((ranks > 0) & (ranks <= k)))
