"""F's verdict on the evaluation queries themselves (the paper's Fig. 1 in miniature).

For every val query, the foundation model F (`common.foundation_checkpoint`) answers the calibrate stage's `verify`
prompt over (Picture 1 = reference, Picture 2 = the ground-truth target, the query's original text), scored as in
Stage 3 (`calibrate.Calibrator.p_yes`, batches of calibrate.batch_size). F "verifies" a query when P(yes) >=
calibrate.vqa_threshold; the report then compares the retrievers' R@1 on the queries F verifies with the rest: the
paper's point is that the retriever fails on queries its own foundation model understands.

Outputs: verify_<split>.json = {"checkpoint", "threshold", "p_yes": {qid: P(yes)}} per split with ground truths.
CIRCO queries (several ground truths) are verified against their first one.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np
from ml_collections import ConfigDict

from recall_jax import files, parallel
from recall_jax.data.prompts import join_captions
from recall_jax.data.records import CIRSplit
from recall_jax.eval.results import write_json_atomic
from recall_jax.generate import prompt_files
from recall_jax.generate.sampler import Sampler
from recall_jax.stages import calibrate, common, data_source

log = logging.getLogger("recall_jax")


def split_items(split: CIRSplit, caption_join: str) -> list[tuple[str, str, str]]:
  """(reference, ground-truth target, original text) per query, in split order."""
  return [(q.reference, q.target, join_captions(q.captions, caption_join)) for q in split.queries]


def run(cfg: ConfigDict, workdir: str, splits: Sequence[CIRSplit], out: str, *,
        sampler: Optional[Sampler] = None, mesh=None) -> dict:
  """Writes verify_<split>.json under `out` for every split with ground truths; returns the summary."""
  splits = [s for s in splits if s.queries and s.queries[0].targets]
  checkpoint = common.foundation_checkpoint(cfg, workdir)
  template = "verify" if cfg.calibrate.verify_turns == 1 else " + ".join(prompt_files.VERIFY_TURN_TEMPLATES)
  summary = {"checkpoint": checkpoint, "threshold": cfg.calibrate.vqa_threshold, "template": template, "splits": {}}
  if not splits:
    return summary
  if sampler is None:
    mesh = mesh if mesh is not None else parallel.mesh_from_config(cfg)
    model, tokenizer = common.load_base_model(cfg, workdir, checkpoint, mesh=mesh)
    sampler = Sampler(model, tokenizer, cache_buckets=cfg.calibrate.prompt_lengths, mesh=mesh)
  calibrator = calibrate.Calibrator(sampler, sampler.tokenizer, cfg.calibrate, common.encode_config(cfg),
                                    data_source.image_loader(cfg, workdir, splits))
  files.makedirs(out)
  for split in splits:
    tag = split.dataset + (f"_{split.category}" if split.category else "")
    p_yes = calibrator.decide_holistic(split_items(split, cfg.data.caption_join)).p_yes  # as Stage 3 verifies
    if not np.isfinite(p_yes).all():
      raise ValueError(f"foundation verification of {tag}: non-finite P(yes) from {checkpoint}")
    path = write_json_atomic(os.path.join(out, f"verify_{tag}.json"), {
        "checkpoint": checkpoint, "threshold": cfg.calibrate.vqa_threshold,
        "prompt_dir": prompt_files.resolve_dir(cfg.calibrate.prompt_dir),
        "p_yes": {q.qid: float(p) for q, p in zip(split.queries, p_yes)}})
    verified = int((p_yes >= cfg.calibrate.vqa_threshold).sum())
    summary["splits"][tag] = {"queries": len(split.queries), "verified": verified, "path": path}
    log.info("[evaluate] F verifies %d/%d %s queries (P(yes) >= %g)", verified, len(split.queries), tag,
             cfg.calibrate.vqa_threshold)
  return summary
