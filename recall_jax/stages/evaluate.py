"""Evaluation stage: embed each split of the configured dataset, rank, score under the dataset's protocol, and write
results (with protocol, config and checkpoint), ranked lists / submission files, per-query ground-truth ranks and a
contact sheet of retrievals, for the baseline and the refined model of every round (same protocol, same split)."""

from __future__ import annotations

import logging
import os
from typing import Optional

from ml_collections import ConfigDict

from recall_jax import files, parallel, viz
from recall_jax.eval import embeddings, metrics, results, retrieval, submission
from recall_jax.stages import artifacts, common, data_source, verify_queries

log = logging.getLogger("recall_jax")


def models_to_evaluate(cfg: ConfigDict, workdir: str) -> tuple[list[tuple[str, Optional[str]]], list[int]]:
  """([(model tag, training stage whose adapters it uses)], rounds 1..config rounds not finished).

  "baseline" = adapt's best adapters, "round<r>" = round r's refine; before Stage 1 only "base" (no adapters)."""
  if not artifacts.is_done(workdir, "adapt"):
    return [("base", None)], list(range(1, cfg.rounds + 1))
  done = common.finished_rounds(cfg, workdir)
  models = [("baseline", "adapt")] + [(artifacts.round_tag(r), artifacts.round_stage("refine", r)) for r in done]
  return models, [r for r in range(1, cfg.rounds + 1) if r not in done]


def evaluate_model(cfg: ConfigDict, workdir: str, out: str, model, tokenizer, checkpoint: str, *,
                   mesh=None) -> tuple[dict, dict]:
  """One model on cfg.eval.split: results_<split>.json, ranked lists, ranks_<split>.json (per-query rank of the
  ground truth) and retrieval sheets under `out`; returns (metrics per split, ranks per split)."""
  files.makedirs(out)
  encode_cfg = common.encode_config(cfg)
  summary, per_category, ranks = {}, {}, {}
  for split in common.read_splits(cfg, workdir, cfg.eval.split):
    tag = split.dataset + (f"_{split.category}" if split.category else "")
    protocol = common.protocol(cfg, split.dataset)
    load = data_source.image_loader(cfg, workdir, [split])
    q, g = embeddings.embed_split(model, split, tokenizer=tokenizer, encode_cfg=encode_cfg,
                                  batch_size=cfg.eval.batch_size, load=load, mesh=mesh)
    ranking = retrieval.rank_split(split, q, g, protocol)
    submission.write_split_outputs(out, "eval", split, ranking, protocol)
    if split.queries and split.queries[0].targets:
      scores = retrieval.split_metrics(split, ranking, protocol)
      results.write_results(os.path.join(out, f"results_{tag}.json"), metrics=scores, protocol=protocol,
                            config=cfg.to_dict(), checkpoint=checkpoint)
      ranks[tag] = retrieval.ground_truth_ranks(split, ranking)
      results.write_json_atomic(os.path.join(out, f"ranks_{tag}.json"), {
          "checkpoint": checkpoint, "top_k": int(ranking.indices.shape[1]), "protocol": protocol,
          "embedding_fingerprint": embeddings.fingerprint(q, g), "ranks": ranks[tag]})
      summary[tag] = scores
      if split.category:
        per_category[split.category] = scores
      log.info("[evaluate] %s %s: %s", tag, cfg.eval.split, " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
    _sheet(split, ranking, load, os.path.join(out, f"retrievals_{tag}.png"), cfg.eval.sheet_queries,
           title=f"{tag} {cfg.eval.split}: reference, then top-5 (green = ground truth)")
  if per_category:
    summary["fashioniq_average"] = metrics.fashioniq_summary(per_category)
  return summary, ranks


def run(cfg: ConfigDict, workdir: str, out: str, *, model=None, tokenizer=None, checkpoint: Optional[str] = None,
        mesh=None, verify_sampler=None) -> dict:
  """Evaluates, with the same protocol on cfg.eval.split, the baseline (adapt's adapters) and the refined model of
  every finished round, each under out/<tag>/ (`models_to_evaluate`); with config eval.foundation_verification,
  F's P(yes) per query under out/foundation/. A given `model` is evaluated alone, into `out` itself. Models run on
  `mesh` (default: the config's; a given model is placed on it)."""
  mesh = mesh if mesh is not None else parallel.mesh_from_config(cfg)
  if model is not None:
    common.place_model(model, cfg, mesh)
    summary, _ = evaluate_model(cfg, workdir, out, model, tokenizer, checkpoint or "given model", mesh=mesh)
    return {"split": cfg.eval.split, "checkpoint": checkpoint, "metrics": summary}
  models, missing = models_to_evaluate(cfg, workdir)
  if missing and artifacts.is_done(workdir, "adapt"):
    log.warning("[evaluate] rounds %s of config rounds = %d have not finished: not evaluated", missing, cfg.rounds)
  base = common.foundation_checkpoint(cfg, workdir)
  entries = {}
  for tag, stage in models:
    model, tokenizer, adapter_dir = common.load_retriever(cfg, workdir, stage, mesh=mesh) if stage else (
        *common.load_base_model(cfg, workdir, mesh=mesh), None)
    checkpoint = f"{base} + {adapter_dir}" if adapter_dir else base
    log.info("[evaluate] %s: %s", tag, checkpoint)
    summary, _ = evaluate_model(cfg, workdir, os.path.join(out, tag), model, tokenizer, checkpoint, mesh=mesh)
    entries[tag] = {"stage": stage, "adapter_dir": adapter_dir, "checkpoint": checkpoint,
                    "dir": os.path.join(out, tag), "metrics": summary}
    del model
  foundation = None
  if cfg.eval.foundation_verification:
    foundation = verify_queries.run(cfg, workdir, common.read_splits(cfg, workdir, cfg.eval.split),
                                    os.path.join(out, "foundation"), sampler=verify_sampler, mesh=mesh)
  return {"split": cfg.eval.split, "models": entries, "metrics": {t: e["metrics"] for t, e in entries.items()},
          "missing_rounds": missing, "foundation_verification": foundation}


def _sheet(split, ranking, load, path: str, n: int, title: str) -> None:
  rows = []
  for i, q in enumerate(split.queries[:n]):
    ranked = [split.gallery[j] for j in ranking.indices[i] if j >= 0]
    rows.append({"reference": q.reference, "text": " / ".join(q.captions), "ranked": ranked,
                 "targets": list(q.targets)})
  if rows:
    viz.retrieval_sheet(rows, load, path, top_k=5, title=title)
