"""Ranked-list and test-server files: CIRR (rc2 JSON pair), CIRCO, and per-query ranked lists for any split.

CIRR server: recall_submission_<name>.json = {"version": "rc2", "metric": "recall", "<pairid>": [50 names]} and
recall_subset_submission_<name>.json = {..., "metric": "recall_subset", "<pairid>": [3 names]}.
CIRCO server: {"<query id>": [50 integer COCO image ids]}.
A ranking cut to a gallery smaller than 50 (synthetic worlds) gives every candidate it has.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from recall_jax.data.records import CIRSplit
from recall_jax.eval.ranking import Ranking
from recall_jax.eval.results import write_json_atomic

TOP_K = 50
SUBSET_TOP_K = 3


def _check(split: CIRSplit, ranking: Ranking) -> None:
  if ranking.indices.shape[0] != len(split.queries):
    raise ValueError(f"{split.dataset}/{split.split}: ranking has {ranking.indices.shape[0]} rows for "
                     f"{len(split.queries)} queries")


def _top_names(split: CIRSplit, row: np.ndarray, k: int) -> list[str]:
  return [split.gallery[i] for i in row[:k] if i >= 0]


def cirr_submission(split: CIRSplit, ranking: Ranking) -> tuple[dict[str, Any], dict[str, Any]]:
  """The two CIRR server dicts (recall, recall_subset) for a ranked CIRR split."""
  if split.dataset != "cirr" or ranking.subset is None:
    raise ValueError(f"cirr_submission needs a CIRR split ranked with its subsets, got {split.dataset}")
  _check(split, ranking)
  recall = {"version": "rc2", "metric": "recall"}
  subset = {"version": "rc2", "metric": "recall_subset"}
  for q, row, sub in zip(split.queries, ranking.indices, ranking.subset):
    recall[q.qid] = _top_names(split, row, TOP_K)
    subset[q.qid] = _top_names(split, sub[sub >= 0], SUBSET_TOP_K)
  return recall, subset


def write_cirr_submission(out_dir: str, name: str, split: CIRSplit, ranking: Ranking) -> tuple[str, str]:
  recall, subset = cirr_submission(split, ranking)
  return (write_json_atomic(os.path.join(out_dir, f"recall_submission_{name}.json"), recall),
          write_json_atomic(os.path.join(out_dir, f"recall_subset_submission_{name}.json"), subset))


def circo_submission(split: CIRSplit, ranking: Ranking) -> dict[str, list[int]]:
  """{query id: top-50 gallery ids as integers} (COCO names are zero-padded ids)."""
  if split.dataset != "circo":
    raise ValueError(f"circo_submission needs a CIRCO split, got {split.dataset}")
  _check(split, ranking)
  out = {}
  for q, row in zip(split.queries, ranking.indices):
    names = _top_names(split, row, TOP_K)
    bad = [n for n in names if not n.isdigit()]
    if bad:
      raise ValueError(f"{q.source or q.qid}: CIRCO gallery names must be numeric COCO ids, got {bad[:3]}")
    out[q.qid] = [int(n) for n in names]
  return out


def write_circo_submission(out_dir: str, name: str, split: CIRSplit, ranking: Ranking) -> str:
  return write_json_atomic(os.path.join(out_dir, f"circo_submission_{name}.json"), circo_submission(split, ranking))


def ranked_lists(split: CIRSplit, ranking: Ranking, protocol: Mapping[str, Any]) -> dict[str, Any]:
  """Per query: its id, reference, ground truths, top-50 names (and top-3 of the subset for CIRR)."""
  _check(split, ranking)
  queries = []
  for row, q in enumerate(split.queries):
    entry = {"qid": q.qid, "reference": q.reference, "targets": list(q.targets),
             "top": _top_names(split, ranking.indices[row], TOP_K)}
    if ranking.subset is not None:
      sub = ranking.subset[row]
      entry["subset_top"] = _top_names(split, sub[sub >= 0], SUBSET_TOP_K)
    queries.append(entry)
  return {"dataset": split.dataset, "split": split.split, "category": split.category, "protocol": dict(protocol),
          "queries": queries}


def write_ranked_lists(path: str, split: CIRSplit, ranking: Ranking, protocol: Mapping[str, Any]) -> str:
  return write_json_atomic(path, ranked_lists(split, ranking, protocol))


def write_split_outputs(out_dir: str, name: str, split: CIRSplit, ranking: Ranking,
                        protocol: Mapping[str, Any]) -> list[str]:
  """Ranked lists for every split, plus the server files for CIRR and CIRCO; returns the paths written."""
  tag = f"{split.dataset}_{split.split}" + (f"_{split.category}" if split.category else "")
  paths = [write_ranked_lists(os.path.join(out_dir, f"ranked_{tag}_{name}.json"), split, ranking, protocol)]
  if split.dataset == "cirr":
    paths.extend(write_cirr_submission(out_dir, f"{split.split}_{name}", split, ranking))
  elif split.dataset == "circo":
    paths.append(write_circo_submission(out_dir, f"{split.split}_{name}", split, ranking))
  return paths
