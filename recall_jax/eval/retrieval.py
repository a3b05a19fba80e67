"""Gallery/query embedding in fixed-size sharded batches, and the evaluation protocols of each CIR dataset.

`evaluate_split` = `rank_split` (protocol switches -> stable ranking) + `split_metrics` (ranking -> numbers). The
protocol dict is part of every result: papers disagree on reference exclusion and FashionIQ caption joining, so a
number without its protocol is meaningless.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from recall_jax import parallel
from recall_jax.data.records import CIRSplit, DataError
from recall_jax.eval import metrics
from recall_jax.eval.ranking import Ranking, rank_gallery

# ---------------------------------------------------------------------------------------------------------------------
# Embedding in batches.


def embed_in_batches(embed_fn: Callable[[Any], jax.Array], items: Any, batch_size: int,
                     mesh: Optional[Mesh] = None) -> np.ndarray:
  """Embeds `items` in fixed-size batches; returns (N, D) float32 on the host, in item order.

  items:    a pytree of numpy arrays sharing the leading (item) dimension N, identical on every process.
  embed_fn: maps one batch (the same pytree with leading dimension `batch_size`, as jax arrays) to (batch_size, D).
  The last batch is padded by repeating the last item (so the model sees real inputs, never an all-padding row) and
  the padded rows are dropped. With a mesh, every batch is a global array sharded over the mesh's batch axes
  (parallel.BATCH_AXES); each process passes the whole global batch, which jax slices to its devices.
  """
  leaves = jax.tree.leaves(items)
  if not leaves:
    raise ValueError("embed_in_batches: items has no arrays")
  num = leaves[0].shape[0]
  if any(leaf.shape[0] != num for leaf in leaves):
    raise ValueError(f"embed_in_batches: item arrays disagree on N: {[leaf.shape for leaf in leaves]}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if mesh is not None:
    shards = parallel.batch_shards(mesh)
    if batch_size % shards:
      raise ValueError(f"batch_size {batch_size} is not divisible by the {shards} batch shards "
                       f"of mesh {dict(mesh.shape)}")

  outputs = []
  for start in range(0, num, batch_size):
    rows = np.minimum(np.arange(start, start + batch_size), num - 1)  # pad by repeating the last item
    batch = jax.tree.map(lambda x: np.asarray(x)[rows], items)
    if mesh is None:
      batch = jax.tree.map(jax.numpy.asarray, batch)
    else:
      batch = parallel.host_to_global(batch, mesh, global_rows=batch_size)
    out = embed_fn(batch)
    if out.ndim != 2 or out.shape[0] != batch_size:
      raise ValueError(f"embed_fn must return ({batch_size}, D), got {out.shape}")
    out = parallel.to_host(out)
    valid = min(batch_size, num - start)
    outputs.append(np.asarray(out, np.float32)[:valid])
  return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Protocols.

_PROTOCOL_KEYS = {
    "cirr": {"exclude_reference", "recall_ks", "subset_ks", "top_k"},
    "fashioniq": {"exclude_reference", "caption_join", "recall_ks", "top_k"},
    "circo": {"exclude_reference", "map_ks", "recall_ks", "top_k"},
}


def default_protocol(dataset: str) -> dict[str, Any]:
  """The protocol of the method doc (ReCALL code defaults) for a dataset.

  caption_join names how the pipeline joined FashionIQ's two captions ("and": "c1 and c2" raw); it is recorded, the
  joining itself happens at prompt time.
  """
  if dataset == "cirr":
    return {"exclude_reference": True, "recall_ks": [1, 5, 10, 50], "subset_ks": [1, 2, 3], "top_k": 50}
  if dataset == "fashioniq":
    # The papers report R@10 / R@50; R@1 / R@5 too, so every layout has the same recall columns.
    return {"exclude_reference": True, "caption_join": "and", "recall_ks": [1, 5, 10, 50], "top_k": 50}
  if dataset == "circo":
    return {"exclude_reference": False, "map_ks": [5, 10, 25, 50], "recall_ks": [1, 5, 10, 50], "top_k": 50}
  raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(_PROTOCOL_KEYS)}")


def check_protocol(dataset: str, protocol: Mapping[str, Any]) -> None:
  """Exactly the keys its dataset needs, so a typo or a forgotten switch is an error, not a silent default."""
  if dataset not in _PROTOCOL_KEYS:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(_PROTOCOL_KEYS)}")
  keys = set(protocol)
  if keys != _PROTOCOL_KEYS[dataset]:
    raise ValueError(f"{dataset} protocol: missing keys {sorted(_PROTOCOL_KEYS[dataset] - keys)}, "
                     f"unknown keys {sorted(keys - _PROTOCOL_KEYS[dataset])}")
  if not isinstance(protocol["exclude_reference"], bool):
    raise ValueError(f"protocol exclude_reference must be a bool, got {protocol['exclude_reference']!r}")
  if dataset == "fashioniq" and not (isinstance(protocol["caption_join"], str) and protocol["caption_join"]):
    raise ValueError(f"protocol caption_join must name the joining used, got {protocol['caption_join']!r}")


def _gallery_index(split: CIRSplit) -> dict[str, int]:
  index = {name: i for i, name in enumerate(split.gallery)}
  if len(index) != len(split.gallery):
    raise DataError(f"{split.dataset}/{split.split}: the gallery lists some image names twice")
  return index


def rank_split(split: CIRSplit, query_emb: np.ndarray, gallery_emb: np.ndarray,
               protocol: Mapping[str, Any]) -> Ranking:
  """Ranks the split's gallery for each query under `protocol` (top_k cut to the gallery size; CIRR subsets too)."""
  check_protocol(split.dataset, protocol)
  if len(query_emb) != len(split.queries) or len(gallery_emb) != len(split.gallery):
    raise ValueError(f"{split.dataset}/{split.split}: {len(query_emb)} query / {len(gallery_emb)} gallery "
                     f"embeddings for {len(split.queries)} queries / {len(split.gallery)} gallery images")
  index = _gallery_index(split)
  exclude = None
  if protocol["exclude_reference"]:
    exclude = np.array([index.get(q.reference, -1) for q in split.queries], np.int32)
  subsets = None
  if split.dataset == "cirr":
    width = max((len(q.subset) for q in split.queries), default=0)
    subsets = np.full((len(split.queries), width), -1, np.int32)
    for row, q in enumerate(split.queries):
      if not q.subset:
        raise DataError(f"{q.source or q.qid}: CIRR query without img_set members")
      missing = [m for m in q.subset if m not in index]
      if missing:
        raise DataError(f"{q.source or q.qid}: img_set members {missing} are not in the gallery")
      subsets[row, :len(q.subset)] = [index[m] for m in q.subset]
  removable = int(exclude is not None and (exclude >= 0).any())
  top_k = min(int(protocol["top_k"]), len(split.gallery) - removable)
  return rank_gallery(query_emb, gallery_emb, exclude=exclude, top_k=top_k, subsets=subsets)


def _target_indices(split: CIRSplit) -> list[list[int]]:
  """Per query, the gallery indices of its ground truths (which must be in the gallery)."""
  index = _gallery_index(split)
  targets = []
  for q in split.queries:
    if not q.targets:
      raise DataError(f"{q.source or q.qid}: no ground truth; {split.split} split can only be ranked for submission")
    missing = [t for t in q.targets if t not in index]
    if missing:
      raise DataError(f"{q.source or q.qid}: ground truth {missing} not in the {split.dataset}/{split.split} gallery")
    targets.append([index[t] for t in q.targets])
  return targets


def ground_truth_ranks(split: CIRSplit, ranking: Ranking) -> dict[str, int | None]:
  """{qid: 1-based rank of the query's first ground truth in the ranking}, None when it lies beyond the ranking's
  top-k; the same ranks split_metrics counts, so R@k = % of queries with rank <= k."""
  ranks = metrics.first_hit_ranks(ranking.indices, _target_indices(split))
  out = {q.qid: (int(r) if r else None) for q, r in zip(split.queries, ranks)}
  if len(out) != len(split.queries):
    raise DataError(f"{split.dataset}/{split.split}: query ids are not unique")
  return out


def split_metrics(split: CIRSplit, ranking: Ranking, protocol: Mapping[str, Any]) -> dict[str, float]:
  """The dataset's metrics from a ranking of this split (targets must be in the gallery)."""
  check_protocol(split.dataset, protocol)
  targets = _target_indices(split)
  # A ranking cut to the gallery size is complete: R@50 over 30 candidates is then exact.
  complete = ranking.indices.shape[1] < int(protocol["top_k"])
  # R@k (any ground truth in the top k) for every dataset, so all layouts share the same recall columns.
  out = metrics.recall_at_k(ranking.indices, targets, protocol["recall_ks"], complete=complete)
  if split.dataset == "circo":
    out.update(metrics.map_at_k(ranking.indices, targets, protocol["map_ks"], complete=complete))
  if split.dataset == "cirr":
    out.update(metrics.recall_subset_at_k(ranking.subset, targets, protocol["subset_ks"]))
    out["Avg"] = metrics.cirr_avg(out)
  return out


def evaluate_split(split: CIRSplit, query_emb: np.ndarray, gallery_emb: np.ndarray,
                   protocol: Mapping[str, Any]) -> dict[str, Any]:
  """Metrics of one split with everything needed to read them: dataset, split, category, sizes, protocol."""
  ranking = rank_split(split, query_emb, gallery_emb, protocol)
  return {
      "dataset": split.dataset, "split": split.split, "category": split.category,
      "num_queries": len(split.queries), "gallery_size": len(split.gallery),
      "protocol": dict(protocol), "metrics": split_metrics(split, ranking, protocol),
  }
