"""Stage 2, self-guided informative-instance mining: where does the retriever fail on its own training set?

Every training query is embedded with the retriever and ranked against the training image pool (the train split's
gallery; one pool per FashionIQ category) with its reference removed from the ranking. A query fails when its
ground truth is not ranked first; its informative instances are the images ranked above the ground truth when the
ground truth is inside the top-k, otherwise the top-k, at most `max_per_query` of them (`select_instances`).
Ablations (cfg.mine.strategy): "random" draws, for each failing query, as many images as self-guided mining would
take, uniformly from the retriever's top-`random_pool` ranking (never the reference or the ground truth), seeded;
"hard_negative" takes the top-k non-ground-truth images of every query, failing or not.

Ranks are 1-based positions in the ranking without the reference; ties are broken by gallery order, as in
evaluation, so a ground truth tied with an earlier gallery image is not ranked first.

Outputs: mined.jsonl (one record per (query, instance)), mined.png (a contact sheet of failures), and the summary in
the manifest.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from recall_jax import files, parallel, viz
from recall_jax.data.prompts import join_captions
from recall_jax.data.records import CIRSplit
from recall_jax.eval import embeddings
from recall_jax.stages import artifacts, common, data_source

log = logging.getLogger("recall_jax")

STRATEGIES = ("self_guided", "random", "hard_negative")
MINED = "mined.jsonl"
SHEET = "mined.png"


def select_instances(ranking_row: Sequence[int], gt_index: int, ref_index: int, top_k: int, cap: int) -> list[int]:
  """The informative instances of one query (gallery indices, best first); [] when the ground truth ranks first.

  ranking_row: gallery indices best first (the whole ranking, or at least its first top_k + 2 entries; a ground
  truth missing from a shorter row counts as outside the top-k). The reference (ref_index, -1 for none) is
  removed before choosing, so it never shifts the top-k nor becomes an instance.
  """
  if top_k < 1 or cap < 1:
    raise ValueError(f"top_k ({top_k}) and cap ({cap}) must be >= 1 (config mine.top_k / mine.max_per_query)")
  row = [int(i) for i in ranking_row if int(i) != ref_index and int(i) >= 0]
  head = row[:top_k]
  if gt_index in head:
    head = head[:head.index(gt_index)]  # the images ranked above the ground truth (none when it is first)
  return head[:cap]


@functools.partial(jax.jit, static_argnames=("top_k",))
def _rank_with_probes(query: jax.Array, gallery: jax.Array, exclude: jax.Array, probes: jax.Array, *,
                      top_k: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """query (C, D), gallery (G, D), exclude (C,), probes (C, P) gallery indices (-1 = none) -> top-k indices and
  scores (C, top_k), and each probe's 1-based rank and score (C, P), all without the excluded image.

  Similarities as eval.ranking.rank_chunk (fp32, highest precision, -0.0 -> 0.0); a probe's rank counts the images
  scoring higher plus the equal ones earlier in the gallery, which is lax.top_k's tie order."""
  sims = jnp.dot(query.astype(jnp.float32), gallery.astype(jnp.float32).T,
                 precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  index = jnp.arange(gallery.shape[0])
  sims = jnp.where(index[None, :] == exclude[:, None], -jnp.inf, jnp.where(sims == 0, 0.0, sims))
  scores, indices = jax.lax.top_k(sims, top_k)
  probe_scores = jnp.take_along_axis(sims, jnp.maximum(probes, 0), axis=1)
  above = (sims[:, None, :] > probe_scores[:, :, None]) | (
      (sims[:, None, :] == probe_scores[:, :, None]) & (index[None, None, :] < probes[:, :, None]))
  ranks = jnp.sum(above, axis=-1) + 1
  return indices, scores, jnp.where(probes >= 0, ranks, -1), probe_scores


def rank_probes(query_emb: np.ndarray, gallery_emb: np.ndarray, exclude: np.ndarray, probes: np.ndarray, top_k: int,
                chunk_size: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Numpy wrapper of `_rank_with_probes` over fixed-size query chunks (one compilation)."""
  num_q = len(query_emb)
  chunk = max(1, min(chunk_size, num_q))
  outs = []
  for start in range(0, num_q, chunk):
    stop = min(start + chunk, num_q)
    pad = chunk - (stop - start)
    res = _rank_with_probes(np.pad(query_emb[start:stop], ((0, pad), (0, 0))), gallery_emb,
                            np.pad(exclude[start:stop], (0, pad), constant_values=-1),
                            np.pad(probes[start:stop], ((0, pad), (0, 0)), constant_values=-1), top_k=top_k)
    outs.append([np.asarray(x)[:stop - start] for x in res])
  return tuple(np.concatenate(parts) for parts in zip(*outs))


def _indices(split: CIRSplit) -> tuple[np.ndarray, np.ndarray]:
  """(reference index, ground-truth index) per query into split.gallery; errors name the query."""
  position = {name: i for i, name in enumerate(split.gallery)}
  refs, gts = [], []
  for q in split.queries:
    if len(q.targets) != 1:
      raise ValueError(f"mining needs exactly one ground truth per training query; query {q.qid} ({q.source}) has "
                       f"{len(q.targets)}")
    for role, name in (("reference", q.reference), ("target", q.target)):
      if name not in position:
        raise ValueError(f"query {q.qid} ({q.source}): {role} {name!r} is not in the training image pool of "
                         f"{split.dataset}/{split.split}{'/' + split.category if split.category else ''}")
    refs.append(position[q.reference])
    gts.append(position[q.target])
  return np.asarray(refs, np.int32), np.asarray(gts, np.int32)


def choose(strategy: str, ranked: np.ndarray, refs: np.ndarray, gts: np.ndarray, top_k: int, cap: int,
           seed: int, random_pool: int = 50) -> list[list[int]]:
  """Instances per query by the configured strategy (gallery indices).

  ranked: each query's best-first gallery indices without its reference, at least max(top_k, random_pool) wide
  for the random strategy. "random" draws as many instances as self-guided mining takes for that query (so only
  for failing queries, at most `cap`) from the first `random_pool` ranked images less the ground truth."""
  if strategy not in STRATEGIES:
    raise ValueError(f"config mine.strategy must be one of {STRATEGIES}, got {strategy!r}")
  if strategy == "random" and random_pool < 1:
    raise ValueError(f"config mine.random_pool must be >= 1, got {random_pool}")
  chosen = []
  for i in range(len(ranked)):
    row = ranked[i].tolist()
    if strategy == "hard_negative":
      chosen.append([j for j in row[:top_k] if j != gts[i]][:cap])
      continue
    own = select_instances(row, int(gts[i]), int(refs[i]), top_k, cap)
    if strategy == "self_guided":
      chosen.append(own)
      continue
    pool = np.asarray([j for j in row[:random_pool] if j not in (refs[i], gts[i])], np.int64)
    rng = np.random.default_rng([seed, i])
    chosen.append(sorted(rng.choice(pool, size=min(len(own), len(pool)), replace=False).tolist()))
  return chosen


def mine_split(split: CIRSplit, query_emb: np.ndarray, gallery_emb: np.ndarray, mcfg: ConfigDict,
               caption_join: str) -> tuple[list[dict], dict]:
  """The mined records of one split and its summary."""
  if not split.queries:
    raise ValueError(f"{split.dataset}/{split.split}{'/' + split.category if split.category else ''} has no "
                     "queries to mine (config mine.split)")
  refs, gts = _indices(split)
  num_g = len(split.gallery)
  top_k = min(mcfg.top_k, num_g - 1)
  # The random strategy draws from a wider head of the ranking than the top-k.
  width = min(max(top_k, mcfg.random_pool if mcfg.strategy == "random" else 0), num_g - 1)
  # Ranking the ground truth too gives its rank even when it lies outside the top-k.
  ranked, _, gt_rank, gt_score = rank_probes(query_emb, gallery_emb, refs, gts[:, None], width)
  gt_rank, gt_score = gt_rank[:, 0], gt_score[:, 0]
  chosen = choose(mcfg.strategy, ranked, refs, gts, top_k, mcfg.max_per_query, mcfg.seed, mcfg.random_pool)
  width = max([len(c) for c in chosen] + [1])
  probes = np.asarray([c + [-1] * (width - len(c)) for c in chosen], np.int32)
  _, _, inst_rank, inst_score = rank_probes(query_emb, gallery_emb, refs, probes, top_k)
  records = []
  for i, q in enumerate(split.queries):
    for j, g in enumerate(chosen[i]):
      if g in (refs[i], gts[i]):
        raise AssertionError(f"query {q.qid}: instance {split.gallery[g]} is its reference or ground truth")
      instance = split.gallery[g]
      records.append({
          "id": f"{split.dataset}/{q.qid}#{instance}", "qid": q.qid, "dataset": split.dataset, "split": split.split,
          "category": q.category, "reference": q.reference, "captions": list(q.captions),
          "text": join_captions(q.captions, caption_join), "targets": list(q.targets), "instance": instance,
          "instance_rank": int(inst_rank[i, j]), "gt_rank": int(gt_rank[i]),
          "instance_similarity": float(inst_score[i, j]), "gt_similarity": float(gt_score[i]),
          "group": q.group_key, "strategy": mcfg.strategy,
      })
  failures = int((gt_rank > 1).sum())
  with_instances = sum(1 for c in chosen if c)
  summary = {
      "queries": len(split.queries), "gallery": num_g, "failures": failures,
      "failure_rate": failures / max(len(split.queries), 1), "instances": len(records),
      "queries_with_instances": with_instances,
      "instances_per_failing_query": (sum(len(c) for c, r in zip(chosen, gt_rank) if r > 1) / failures
                                      if failures else 0.0),
  }
  return records, summary


def _sheet(records: list[dict], load, path: str, n: int, title: str) -> None:
  by_query: dict[str, list[dict]] = {}
  for r in records:
    by_query.setdefault(f"{r['dataset']}/{r['qid']}", []).append(r)
  items = []
  for rs in list(by_query.values())[:n]:
    r = rs[0]
    items.append({"reference": r["reference"], "text": f"{r['text']}\n(GT rank {r['gt_rank']})",
                  "images": [(r["targets"][0], f"GT r{r['gt_rank']}", "ok"),
                             *[(x["instance"], f"r{x['instance_rank']}", "bad") for x in rs]]})
  if items:
    viz.triplet_sheet(items, load, path, title=title)


def run(cfg: ConfigDict, workdir: str, out: str, *, model=None, tokenizer=None, mesh=None,
        round_num: int = 1) -> dict:
  """Mines cfg.mine.split with `model` (default: round `round_num`'s retriever, base + the adapters of
  `common.round_start_stage`: adapt's in round 1, the previous round's refine after), embedding on `mesh`
  (default: the config's; a given model is placed on it); returns the manifest, which names the adapters used and
  fingerprints the embeddings. Every process ranks the gathered embeddings alike; process 0 writes."""
  mcfg = cfg.mine
  if mcfg.strategy not in STRATEGIES:
    raise ValueError(f"config mine.strategy must be one of {STRATEGIES}, got {mcfg.strategy!r}")
  adapter_dir = None
  mesh = mesh if mesh is not None else parallel.mesh_from_config(cfg)
  if model is None:
    model, tokenizer, adapter_dir = common.round_retriever(cfg, workdir, round_num, mesh=mesh)
  else:
    common.place_model(model, cfg, mesh)
  encode_cfg = common.encode_config(cfg)
  records, splits, fingerprints = [], {}, {}
  read = common.read_splits(cfg, workdir, mcfg.split)
  for split in read:
    tag = split.dataset + (f"_{split.category}" if split.category else "")
    q, g = embeddings.embed_split(model, split, tokenizer=tokenizer, encode_cfg=encode_cfg,
                                  batch_size=mcfg.batch_size, load=data_source.image_loader(cfg, workdir, [split]),
                                  mesh=mesh)
    fingerprints[tag] = embeddings.fingerprint(q, g)
    split_records, splits[tag] = mine_split(split, q, g, mcfg, cfg.data.caption_join)
    log.info("[mine] %s: %d/%d queries fail, %d instances", tag, splits[tag]["failures"], splits[tag]["queries"],
             len(split_records))
    records += split_records
  artifacts.write_jsonl(os.path.join(out, MINED), records)
  sheet = os.path.join(out, SHEET)
  _sheet(records, data_source.image_loader(cfg, workdir, read), sheet, mcfg.sheet_queries,
         title=f"mined ({mcfg.strategy}): reference, ground truth (green), informative instances (red)")
  queries = sum(s["queries"] for s in splits.values())
  failures = sum(s["failures"] for s in splits.values())
  failing_instances = sum(s["instances_per_failing_query"] * s["failures"] for s in splits.values())
  return {
      "round": round_num, "retriever_adapters": adapter_dir, "embedding_fingerprints": fingerprints,
      "strategy": mcfg.strategy, "top_k": mcfg.top_k,
      "max_per_query": mcfg.max_per_query, "split": mcfg.split,
      "random_pool": mcfg.random_pool if mcfg.strategy == "random" else None,
      "queries": queries, "failures": failures, "failure_rate": failures / max(queries, 1),
      "instances": len(records), "instances_per_failing_query": failing_instances / failures if failures else 0.0,
      "splits": splits, "outputs": {"mined": os.path.join(out, MINED),
                                    "sheet": sheet if files.exists(sheet) else None},
  }
