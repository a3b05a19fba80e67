"""Stage 3 -> Stage 4 on the tiny world with a stand-in F that answers correctly: the world's oracle writes the
rewrites (calibrate.rewriter="oracle") and answers the yes/no verification. The kept rewrites are then corrective
triplets that are true for their instances, and refine trains on them in micro-groups with the triplet loss active.
This is the path the demo's taught F has to drive; here it is checked without depending on F's quality."""

import os

import numpy as np
import pytest

from configs import tiny
from recall_jax import main
from recall_jax.data.synthetic.oracle import Oracle
from recall_jax.generate import decide
from recall_jax.stages import artifacts, calibrate, common


def _config():
  cfg = tiny.get_config()
  cfg.world.image_size = 56
  cfg.data.image_buckets = 56
  cfg.data.dataset = "cirr"
  cfg.train.steps = 2
  cfg.refine.steps = 4
  cfg.train.global_batch_size = 8
  cfg.train.log_every = 1
  cfg.train.checkpoint_every = cfg.train.eval_every = 100
  cfg.train.data_threads = 1
  cfg.lora.rank = 4
  cfg.mine.batch_size = 8
  cfg.mine.sheet_queries = 1
  cfg.calibrate.rewriter = "oracle"
  cfg.calibrate.decomposed_verification = False
  cfg.calibrate.batch_size = 4
  cfg.calibrate.max_records = 12
  cfg.calibrate.sheet_samples = 1
  return cfg


class OracleVerifier:
  """Calibrator.decide for a stand-in F that answers the verification correctly: P(yes) 1 when the new text is true
  of the candidate (per the scene graphs), else 0; it never sees the prompt."""

  def __init__(self, images):
    self.oracle = Oracle(images)
    self.asked = 0

  def __call__(self, calibrator, template, items):
    self.asked += len(items)
    p = [float(self.oracle.judge(reference, text, candidate)) for reference, candidate, text in items]
    return decide.Decisions(np.asarray(p, np.float64), (None,) * len(items), np.zeros((len(items),), bool))


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("standin"))
  cfg = _config()
  main.run(cfg, workdir, ["prepare", "adapt", "mine"])
  images = {n: p for s in common.read_splits(cfg, workdir, cfg.mine.split) for n, p in s.images.items()}
  verifier = OracleVerifier(images)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(calibrate.Calibrator, "decide", lambda self, template, items: verifier(self, template, items))
    main.run(cfg, workdir, ["calibrate"])
  main.run(cfg, workdir, ["refine"])
  return workdir, verifier


def test_the_stand_in_keeps_oracle_correct_corrective_triplets(looped):
  workdir, verifier = looped
  manifest = artifacts.read_manifest(workdir, "calibrate")
  samples = artifacts.read_jsonl(manifest["outputs"]["generations"])
  corrective = artifacts.read_jsonl(manifest["outputs"]["corrective"])
  assert verifier.asked > 0
  kept = [s for s in samples if s["kept"]]
  assert len(kept) == len(corrective) > 0
  assert all(s["oracle_correct"] and s["p_yes"] == 1.0 for s in kept)
  assert all(not s["oracle_correct"] for s in samples if s["text"] is not None and not s["kept"])
  for c in corrective:  # the instance is the new target of the rewritten text
    assert c["targets"] == [c["instance"]]


def test_refine_trains_on_micro_groups_with_the_triplet_loss(looped):
  workdir, _ = looped
  manifest = artifacts.read_manifest(workdir, "refine")
  kept = artifacts.read_manifest(workdir, "calibrate")["statistics"]["kept"]
  assert manifest["mode"] == "corrective" and manifest["grouped"] and manifest["triplet_weight"] > 0
  assert manifest["corrective_triplets"] == kept > 0
  steps = [r for r in artifacts.read_jsonl(os.path.join(artifacts.stage_dir(workdir, "refine"), "metrics.jsonl"))
           if "train/triplet_pairs" in r]
  assert len(steps) == 4
  assert max(r["train/triplet_pairs"] for r in steps) > 0  # an original and its corrective sibling met in a batch
  assert max(r["train/triplet_loss"] for r in steps) > 0
  assert all(np.isfinite(r["train/loss"]) for r in steps)
