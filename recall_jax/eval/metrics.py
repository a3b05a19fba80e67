"""Retrieval metrics over rankings (pure numpy), as the CIR benchmarks define them.

A ranking is an int array (Q, K) of gallery indices, best first; entries of -1 are empty slots (e.g. the removed
reference in a subset ranking) and never count as hits. Targets are, per query, the gallery indices of its ground
truths. Every metric is returned in percent (0-100), the unit the papers report.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def target_hits(ranking: np.ndarray, targets: Sequence[Sequence[int]]) -> np.ndarray:
  """Bool (Q, K): whether ranking[q, i] is a ground truth of query q."""
  ranking = np.asarray(ranking)
  if ranking.ndim != 2 or len(targets) != ranking.shape[0]:
    raise ValueError(f"ranking shape {ranking.shape} does not match {len(targets)} target lists")
  width = max(1, max((len(t) for t in targets), default=1))
  padded = np.full((len(targets), width), -1, np.int64)
  for q, t in enumerate(targets):
    if len(t) == 0:
      raise ValueError(f"query {q} has no ground truth: metrics need targets (test splits only get submissions)")
    padded[q, :len(t)] = t
  hits = (ranking[:, :, None] == padded[:, None, :]).any(-1)
  return hits & (ranking >= 0)


def first_hit_ranks(ranking: np.ndarray, targets: Sequence[Sequence[int]]) -> np.ndarray:
  """Int (Q,): the 1-based rank of each query's first ground truth in its ranking, 0 when none is in it (R@k =
  % of queries with 0 < rank <= k)."""
  hits = target_hits(np.asarray(ranking), targets)
  return np.where(hits.any(1), hits.argmax(1) + 1, 0)


def _check_k(ranking: np.ndarray, k: int, complete: bool) -> None:
  if k < 1 or (k > ranking.shape[1] and not complete):
    raise ValueError(f"k={k} needs a ranking of at least k entries, have {ranking.shape[1]} "
                     "(pass complete=True if the ranking holds every candidate)")


def recall_at_k(ranking: np.ndarray, targets: Sequence[Sequence[int]], ks: Sequence[int], *,
                complete: bool = False) -> dict[str, float]:
  """{"R@k": % of queries with any ground truth among the first k}.

  complete: the ranking holds every candidate, so k may exceed its length (small galleries).
  """
  ranking = np.asarray(ranking)
  hits = target_hits(ranking, targets)
  out = {}
  for k in ks:
    _check_k(ranking, k, complete)
    out[f"R@{k}"] = float(100.0 * hits[:, :k].any(1).mean())
  return out


def recall_subset_at_k(subset_ranking: np.ndarray, targets: Sequence[Sequence[int]],
                       ks: Sequence[int]) -> dict[str, float]:
  """CIRR {"Rsubset@k"} over rankings of the `img_set` members only (reference removed, its slot -1 at the end)."""
  return {f"Rsubset@{k}": v for k, v in zip(ks, recall_at_k(subset_ranking, targets, ks).values())}


def cirr_avg(recalls: Mapping[str, float]) -> float:
  """CIRR's headline number: (R@5 + Rsubset@1) / 2."""
  return (recalls["R@5"] + recalls["Rsubset@1"]) / 2.0


def map_at_k(ranking: np.ndarray, targets: Sequence[Sequence[int]], ks: Sequence[int], *,
             complete: bool = False) -> dict[str, float]:
  """CIRCO {"mAP@k"}: AP@k = sum_{i<=k} P@i * rel(i) / min(#ground truths, k), averaged over queries.

  complete: as in recall_at_k.
  """
  ranking = np.asarray(ranking)
  hits = target_hits(ranking, targets).astype(np.float64)
  num_gt = np.array([len(set(t)) for t in targets], np.float64)
  precision = np.cumsum(hits, 1) / np.arange(1, ranking.shape[1] + 1)
  out = {}
  for k in ks:
    _check_k(ranking, k, complete)
    ap = (precision[:, :k] * hits[:, :k]).sum(1) / np.minimum(num_gt, k)
    out[f"mAP@{k}"] = float(100.0 * ap.mean())
  return out


def fashioniq_summary(per_category: Mapping[str, Mapping[str, float]], ks: Sequence[int] = (10, 50)
                      ) -> dict[str, float]:
  """Means over FashionIQ categories of every R@k they all report (mean_R@1, ...), plus "avg" = the mean of the
  mean R@k over `ks` (the usual single number: R@10 and R@50)."""
  if not per_category:
    raise ValueError("fashioniq_summary needs at least one category")
  for k in ks:
    missing = [c for c, m in per_category.items() if f"R@{k}" not in m]
    if missing:
      raise ValueError(f"categories {missing} have no R@{k}")
  shared = set.intersection(*(set(m) for m in per_category.values()))
  recall_ks = sorted(int(key[2:]) for key in shared if key.startswith("R@"))
  out = {f"mean_R@{k}": float(np.mean([m[f"R@{k}"] for m in per_category.values()])) for k in recall_ks}
  out["avg"] = float(np.mean([out[f"mean_R@{k}"] for k in ks]))
  return out
