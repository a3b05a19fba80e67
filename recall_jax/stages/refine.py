"""Stage 4, targeted refinement: continue training the Stage-1 adapters (fresh optimizer) on the original triplets
plus the kept corrective triplets, in micro-group batches (an original triplet and its corrective siblings share a
batch), with InfoNCE + lambda * the in-group triplet loss.

Ablations (config refine): mode "originals" trains on the original triplets only (the same steps without the
corrective signal); mode "hard_negative" adds each mined instance of this round (mined.jsonl, nothing rewritten) as
an extra negative of its original query: a negative-only slot in its micro-group whose target is the instance.
grouped = False uses plain shuffled batches and turns the triplet loss off."""

from __future__ import annotations

import dataclasses
import logging

from ml_collections import ConfigDict

from recall_jax import parallel, recall_config
from recall_jax.data.records import Query
from recall_jax.models import peft_io
from recall_jax.stages import adapt, artifacts, common
from recall_jax.train import settings

log = logging.getLogger("recall_jax")

MODES = ("corrective", "originals", "hard_negative")


def _records(path: str, required: tuple[str, ...]):
  """(line number, record) of a stage's JSONL file, each checked to hold `required`."""
  for i, r in enumerate(artifacts.read_jsonl(path)):
    missing = [k for k in required if k not in r]
    if missing:
      raise ValueError(f"{path}: record {i + 1} lacks {missing}")
    yield i, r


def corrective_queries(path: str) -> list[Query]:
  """corrective.jsonl (Stage 3) -> training triplets keyed into their original query's micro-group."""
  return [Query(qid=f"corrective/{r['id']}", reference=r["reference"], captions=tuple(r["captions"]),
                targets=tuple(r["targets"]), category=r.get("category"), group=r["group"], source=f"{path}#{i}")
          for i, r in _records(path, ("id", "reference", "captions", "targets", "group"))]


def hard_negative_queries(path: str) -> list[Query]:
  """mined.jsonl (Stage 2) -> negative-only slots: each instance as an extra negative in its query's micro-group."""
  return [Query(qid=f"hard_negative/{r['id']}", reference=r["reference"], captions=tuple(r["captions"]),
                targets=(r["instance"],), category=r.get("category"), group=r["group"], source=f"{path}#{i}",
                negative_only=True)
          for i, r in _records(path, ("id", "reference", "captions", "instance", "group"))]


def extra_queries(mode: str, workdir: str, round_num: int) -> list[Query]:
  """What config refine.mode adds to the original triplets in round `round_num`."""
  if mode == "corrective":
    calibrated = artifacts.read_manifest(workdir, artifacts.round_stage("calibrate", round_num))
    return corrective_queries(calibrated["outputs"]["corrective"])
  if mode == "hard_negative":
    mined = artifacts.read_manifest(workdir, artifacts.round_stage("mine", round_num))
    return hard_negative_queries(mined["outputs"]["mined"])
  if mode == "originals":
    return []
  raise ValueError(f"config refine.mode must be one of {MODES}, got {mode!r}")


def run(cfg: ConfigDict, workdir: str, out: str, *, round_num: int = 1, mesh=None) -> dict:
  """Round `round_num`: starts from `common.round_start_stage`'s adapters (adapt's, then the previous round's) and
  trains on this round's corrective.jsonl."""
  mode = cfg.refine.mode
  if mode not in MODES:
    raise ValueError(f"config refine.mode must be one of {MODES}, got {mode!r}")
  start = common.round_start_stage(round_num)
  start_adapters = common.trained_adapters(cfg, workdir, start)  # checked against the base they go on
  splits = common.read_splits(cfg, workdir, "train")
  originals = [q for s in splits for q in s.queries]
  extra = extra_queries(mode, workdir, round_num)
  # Originals join their siblings' group by the same key (reference + original text).
  queries = originals + extra
  log.info("[refine] mode %s: %d original triplets + %d %s", mode, len(originals), len(extra),
           "hard negatives" if mode == "hard_negative" else "corrective triplets")

  # Stage 1's loop and loss, with refine's steps and weights.
  loop = dataclasses.replace(settings.train_loop(cfg.train), steps=cfg.refine.steps)
  loss = dataclasses.replace(
      settings.loss(cfg.loss), infonce_weight=cfg.refine.infonce_weight, margin=cfg.refine.margin,
      triplet_weight=cfg.refine.triplet_weight if cfg.refine.grouped else 0.0)  # random batches: no groups
  mesh = mesh if mesh is not None else parallel.mesh_from_config(cfg)
  model, tokenizer = common.load_base_model(cfg, workdir, mesh=mesh)
  # Continue from R_base (or round r-1); the trainer starts a fresh optimizer.
  peft_io.import_peft(model, start_adapters, names=common.model_family(cfg).peft_names)
  manifest = adapt.train_on(cfg, workdir, out, queries, splits, grouped=cfg.refine.grouped,
                            model=model, tokenizer=tokenizer, mesh=mesh, loop=loop, loss=loss)
  manifest.update(mode=mode, grouped=bool(cfg.refine.grouped), original_triplets=len(originals),
                  corrective_triplets=len(extra) if mode == "corrective" else 0,
                  hard_negatives=len(extra) if mode == "hard_negative" else 0,
                  triplet_weight=loss.triplet_weight,
                  initialised_from=start_adapters, round=round_num,
                  base_checkpoint=common.foundation_checkpoint(cfg, workdir))
  # The preprocessing, for Embedder.from_pretrained.
  recall_config.write(manifest["adapter_dir"], common.adapter_recall_config(
      cfg, artifacts.round_stage("refine", round_num), manifest["base_checkpoint"]))
  return manifest
