"""Stage 4, targeted refinement: continue training the Stage-1 adapters (fresh optimizer) on the original triplets
plus the kept corrective triplets, in micro-group batches (an original triplet and its corrective siblings share a
batch), with InfoNCE + lambda * the in-group triplet loss."""

from __future__ import annotations

import copy
import logging
import os

from ml_collections import ConfigDict

from recall_jax.data.records import Query
from recall_jax.models import lora
from recall_jax.stages import adapt, artifacts, common

log = logging.getLogger("recall_jax")


def corrective_queries(path: str) -> list[Query]:
  """corrective.jsonl (Stage 3) -> training triplets keyed into their original query's micro-group."""
  out = []
  for i, r in enumerate(artifacts.read_jsonl(path)):
    missing = [k for k in ("id", "reference", "captions", "targets", "group") if k not in r]
    if missing:
      raise ValueError(f"{path}: record {i + 1} lacks {missing}")
    out.append(Query(qid=f"corrective/{r['id']}", reference=r["reference"], captions=tuple(r["captions"]),
                     targets=tuple(r["targets"]), category=r.get("category"), group=r["group"],
                     source=f"{path}#{i}"))
  return out


def run(cfg: ConfigDict, workdir: str, out: str, *, round_num: int = 1) -> dict:
  """Round `round_num`: starts from `common.round_start_stage`'s adapters (adapt's, then the previous round's) and
  trains on this round's corrective.jsonl."""
  start = common.round_start_stage(round_num)
  start_adapters = common.trained_adapters(cfg, workdir, start)  # checked against the base they go on
  calibrated = artifacts.read_manifest(workdir, artifacts.round_stage("calibrate", round_num))
  splits = common.read_splits(cfg, workdir, "train")
  originals = [q for s in splits for q in s.queries]
  corrective = corrective_queries(calibrated["outputs"]["corrective"])
  # Originals join their siblings' group by the same key (reference + original text).
  queries = originals + corrective
  log.info("[refine] %d original + %d corrective triplets", len(originals), len(corrective))

  rcfg = copy.deepcopy(cfg)
  with rcfg.unlocked():
    rcfg.train.steps = cfg.refine.steps
    rcfg.loss.triplet_weight = cfg.refine.triplet_weight
    rcfg.loss.infonce_weight = cfg.refine.infonce_weight
    rcfg.loss.margin = cfg.refine.margin
  model, tokenizer = common.load_base_model(cfg, workdir, mesh=common.training_mesh(cfg))
  lora.import_peft(model, start_adapters)  # continue from R_base (or round r-1); the trainer starts a fresh optimizer
  manifest = adapt.train_on(rcfg, workdir, out, queries, adapt.merged_images(splits), grouped=True, model=model,
                            tokenizer=tokenizer)
  manifest.update(original_triplets=len(originals), corrective_triplets=len(corrective),
                  initialised_from=start_adapters, round=round_num,
                  base_checkpoint=common.foundation_checkpoint(cfg, workdir))
  return manifest
