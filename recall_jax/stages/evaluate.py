"""Evaluation stage: embed each split of the configured dataset, rank, score under the dataset's protocol, and write
results (with protocol, config and checkpoint), ranked lists / submission files and a contact sheet of retrievals."""

from __future__ import annotations

import logging
import os
from typing import Optional

from ml_collections import ConfigDict

from recall_jax import viz
from recall_jax.data.image import load_image
from recall_jax.eval import encode, metrics, results, retrieval, submission
from recall_jax.stages import common

log = logging.getLogger("recall_jax")


def protocol_from_config(cfg: ConfigDict, dataset: str) -> dict:
  protocol = retrieval.default_protocol(dataset)
  if cfg.eval.exclude_reference is not None:
    protocol["exclude_reference"] = bool(cfg.eval.exclude_reference)
  if dataset == "fashioniq":
    protocol["caption_join"] = cfg.data.caption_join
  return protocol


def run(cfg: ConfigDict, workdir: str, out: str, *, model=None, tokenizer=None, checkpoint: Optional[str] = None,
        mesh=None) -> dict:
  """Evaluates `model` (default: the latest retriever: base + the adapters of the last finished training stage) on
  cfg.eval.split; returns the summary manifest."""
  if model is None:
    model, tokenizer, adapter_dir = common.load_retriever(cfg, workdir)
    base = common.prepare.checkpoint_dir(cfg, workdir)
    checkpoint = f"{base} + {adapter_dir}" if adapter_dir else base
  encode_cfg = common.encode_config(cfg)
  summary = {}
  per_category = {}
  for split in common.read_splits(cfg, workdir, cfg.eval.split):
    tag = split.dataset + (f"_{split.category}" if split.category else "")
    protocol = protocol_from_config(cfg, split.dataset)
    q, g = encode.encode_split(model, split, tokenizer=tokenizer, encode_cfg=encode_cfg,
                               batch_size=cfg.eval.batch_size, mesh=mesh)
    ranking = retrieval.rank_split(split, q, g, protocol)
    submission.write_split_outputs(out, "eval", split, ranking, protocol)
    if split.queries and split.queries[0].targets:
      scores = retrieval.split_metrics(split, ranking, protocol)
      results.write_results(os.path.join(out, f"results_{tag}.json"), metrics=scores, protocol=protocol,
                            config=cfg.to_dict(), checkpoint=checkpoint)
      summary[tag] = scores
      if split.category:
        per_category[split.category] = scores
      log.info("[evaluate] %s %s: %s", tag, cfg.eval.split, " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
    _sheet(split, ranking, os.path.join(out, f"retrievals_{tag}.png"), cfg.eval.sheet_queries,
           title=f"{tag} {cfg.eval.split}: reference, then top-5 (green = ground truth)")
  if per_category:
    summary["fashioniq_average"] = metrics.fashioniq_summary(per_category)
  return {"split": cfg.eval.split, "checkpoint": checkpoint, "metrics": summary}


def _sheet(split, ranking, path: str, n: int, title: str) -> None:
  rows = []
  for i, q in enumerate(split.queries[:n]):
    ranked = [split.gallery[j] for j in ranking.indices[i] if j >= 0]
    rows.append({"reference": q.reference, "text": " / ".join(q.captions), "ranked": ranked,
                 "targets": list(q.targets)})
  if rows:
    viz.retrieval_sheet(rows, lambda name: load_image(split.images[name]), path, top_k=5, title=title)
