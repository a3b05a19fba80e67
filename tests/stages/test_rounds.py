"""ReCALL's loop on the tiny world: two rounds of mine -> calibrate -> refine after adapt (few steps, a stand-in for
Stage 3's model calls), then evaluate (baseline + every round) and the report. Round 2 must mine with round 1's
refined adapters and get other embeddings than round 1 (no stale cache), and resume must skip every finished round."""

import json
import os
import types

import numpy as np
import pytest

from configs import tiny as demo
from recall_jax import main, parallel
from recall_jax.eval import embeddings
from recall_jax.stages import artifacts, calibrate, common, evaluate, mine, refine, report

REWRITE = json.dumps({"captions": {}, "intents": [{"span": "x", "edit": "keep", "new_span": "is red"}],
                      "new_text": "is red"})
STAGES = ["prepare", "adapt", "mine", "calibrate", "refine", "evaluate", "report"]


class StandInSampler:
  """Stage 3's model calls without a model: every rewrite parses (staged CoT, new text "is red") and every
  verification says P(yes) = 0.99, so each mined record becomes a kept corrective triplet."""

  def __init__(self, tokenizer):
    self.tokenizer, self.calls = tokenizer, 0

  def generate(self, input_ids, **_):
    self.calls += 1
    return types.SimpleNamespace(lengths=np.full(len(input_ids), 5))

  def decode_text(self, out, skip_special_tokens=True):
    return [REWRITE] * len(out.lengths)

  def score_candidates(self, input_ids, **_):
    p = np.full(len(input_ids), 0.99)
    return types.SimpleNamespace(log_probs=np.log(np.stack([1 - p, p], 1)))


def _config():
  cfg = demo.get_config()
  cfg.rounds = 2
  cfg.world.scale = "tiny"
  cfg.world.image_size = 56
  cfg.data.image_buckets = 56
  cfg.data.dataset = "cirr"  # one split: the cheapest layout to run four trainings on
  cfg.train.steps = 2
  cfg.refine.steps = 2
  cfg.train.global_batch_size = 8  # one example per test device
  cfg.train.log_every = cfg.train.checkpoint_every = cfg.train.eval_every = 2
  cfg.train.best_metric = "R@1"
  cfg.train.data_threads = 1
  cfg.lora.rank = 4
  cfg.optim.lr = 1e-2
  cfg.eval.batch_size = 8
  cfg.eval.sheet_queries = 2
  cfg.mine.batch_size = 8
  cfg.mine.sheet_queries = 2
  cfg.calibrate.prompt_mode = "staged_cot"
  cfg.calibrate.max_records = 0
  cfg.calibrate.sheet_samples = 2
  return cfg


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
  """A workdir where prepare, adapt, two rounds, evaluate and report have run (Stage 3 by the stand-in)."""
  workdir = str(tmp_path_factory.mktemp("rounds"))
  cfg = _config()
  main.run(cfg, workdir, ["prepare", "adapt"])
  tokenizer = common.load_base_model(cfg, workdir)[1]
  samplers = {}

  def stage(name, fn):  # as main.run does it, with the fingerprint, so that main.run resumes these stages
    artifacts.run_stage(workdir, name, fn, current=main.provenance(cfg, workdir, name))

  for r in (1, 2):
    stage(artifacts.round_stage("mine", r), lambda d, r=r: mine.run(cfg, workdir, d, round_num=r))
    samplers[r] = StandInSampler(tokenizer)
    stage(artifacts.round_stage("calibrate", r),
          lambda d, r=r: calibrate.run(cfg, workdir, d, sampler=samplers[r], round_num=r))
    stage(artifacts.round_stage("refine", r), lambda d, r=r: refine.run(cfg, workdir, d, round_num=r))
  main.run(cfg, workdir, ["evaluate", "report"])
  return cfg, workdir, samplers


def test_round_folders_and_adapter_chain(looped):
  cfg, workdir, samplers = looped
  m = {s: artifacts.read_manifest(workdir, s) for s in ["adapt", *artifacts.expand_stages(
      ["mine", "calibrate", "refine"], 2)]}
  for r, prefix in ((1, ""), (2, "round2/")):
    for s in artifacts.ROUND_STAGES:
      assert os.path.isfile(os.path.join(workdir, prefix + s, artifacts.MANIFEST))
    assert m[prefix + "mine"]["round"] == m[prefix + "calibrate"]["round"] == m[prefix + "refine"]["round"] == r
    assert samplers[r].calls > 0
  assert not os.path.exists(os.path.join(workdir, "round1"))  # round 1 keeps the plain folders
  # Round 1 mines with and refines from adapt's adapters; round 2 with round 1's refined ones.
  assert m["mine"]["retriever_adapters"] == m["refine"]["initialised_from"] == m["adapt"]["adapter_dir"]
  assert (m["round2/mine"]["retriever_adapters"] == m["round2/refine"]["initialised_from"]
          == m["refine"]["adapter_dir"] == os.path.join(workdir, "refine", "adapters"))
  assert m["round2/refine"]["adapter_dir"] == os.path.join(workdir, "round2", "refine", "adapters")
  # Each round's calibrate reads its own mined.jsonl, each refine its own corrective.jsonl.
  assert m["round2/calibrate"]["mined_from"] == "round2/mine"
  for prefix in ("", "round2/"):
    mined = artifacts.read_jsonl(os.path.join(workdir, prefix + "mine", mine.MINED))
    assert m[prefix + "calibrate"]["statistics"]["generated"] == len(mined) > 0
    assert m[prefix + "refine"]["corrective_triplets"] == m[prefix + "calibrate"]["statistics"]["kept"] == len(mined)
  assert m["adapt"]["base_checkpoint"] == m["round2/refine"]["base_checkpoint"] == common.foundation_checkpoint(
      cfg, workdir)


def test_round_two_embeds_with_the_refined_model_not_a_stale_cache(looped):
  cfg, workdir, _ = looped
  first = artifacts.read_manifest(workdir, "mine")["embedding_fingerprints"]
  second = artifacts.read_manifest(workdir, "round2/mine")["embedding_fingerprints"]
  assert first.keys() == second.keys() == {"cirr"}
  assert first["cirr"] != second["cirr"]
  # Embedding the train split afresh with each round's retriever reproduces exactly what that round mined with.
  split = common.read_splits(cfg, workdir, cfg.mine.split)[0]
  mesh = parallel.mesh_from_config(cfg)  # mine's: another layout adds in other orders
  for stage, want in (("adapt", first), ("refine", second)):
    model, tokenizer, _ = common.load_retriever(cfg, workdir, stage)
    q, g = embeddings.embed_split(model, split, tokenizer=tokenizer, encode_cfg=common.encode_config(cfg),
                                  batch_size=cfg.mine.batch_size, mesh=mesh)
    assert embeddings.fingerprint(q, g) == want["cirr"], stage


def test_evaluate_writes_baseline_and_every_round(looped):
  cfg, workdir, _ = looped
  manifest = artifacts.read_manifest(workdir, "evaluate")
  assert list(manifest["models"]) == ["baseline", "round1", "round2"] and manifest["missing_rounds"] == []
  fingerprints = set()
  for tag, stage in (("baseline", "adapt"), ("round1", "refine"), ("round2", "round2/refine")):
    entry = manifest["models"][tag]
    assert entry["stage"] == stage
    assert entry["adapter_dir"] == artifacts.read_manifest(workdir, stage)["adapter_dir"]
    out = os.path.join(workdir, "evaluate", tag)
    res = json.load(open(os.path.join(out, "results_cirr.json")))
    assert list(res["metrics"]) == ["R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3", "Avg"]
    assert res["metrics"] == manifest["metrics"][tag]["cirr"] and res["checkpoint"].endswith(entry["adapter_dir"])
    ranks = json.load(open(os.path.join(out, "ranks_cirr.json")))
    assert len(ranks["ranks"]) == 6  # the tiny world's CIRR val queries
    assert 100 * np.mean([r == 1 for r in ranks["ranks"].values()]) == pytest.approx(res["metrics"]["R@1"])
    fingerprints.add(ranks["embedding_fingerprint"])
    assert os.path.getsize(os.path.join(out, "retrievals_cirr.png")) > 1000
    assert os.path.exists(os.path.join(out, "ranked_cirr_val_eval.json"))
  assert len(fingerprints) == 3  # three different models
  foundation = manifest["foundation_verification"]
  assert foundation["checkpoint"] == common.foundation_checkpoint(cfg, workdir)
  p_yes = json.load(open(foundation["splits"]["cirr"]["path"]))["p_yes"]
  assert p_yes.keys() == ranks["ranks"].keys() and all(0.0 <= p <= 1.0 for p in p_yes.values())


def test_report_covers_both_rounds(looped):
  cfg, workdir, _ = looped
  rep = json.load(open(os.path.join(workdir, report.REPORT_JSON)))
  ev = artifacts.read_manifest(workdir, "evaluate")
  assert rep["refined_round"] == 2 and rep["warnings"] == []
  assert rep["baseline"]["cirr"] == ev["metrics"]["baseline"]["cirr"]
  assert rep["refined"]["cirr"] == ev["metrics"]["round2"]["cirr"] and "Rsubset@1" in rep["refined"]["mean"]
  assert [r["tag"] for r in rep["rounds"]] == ["round1", "round2"]
  assert rep["rounds"][1]["mined_with"] == artifacts.read_manifest(workdir, "refine")["adapter_dir"]
  assert set(rep["mining"]) == set(rep["calibration"]) == {"round1", "round2"}
  assert set(rep["fig1"]["pooled"]["R@1"]) == {"baseline", "round1", "round2"}
  assert {"prepare", "adapt", "mine", "round2/mine", "round2/refine", "evaluate"} <= set(rep["stage_seconds"])
  assert os.path.getsize(os.path.join(workdir, report.REPORT_PNG)) > 5000
  assert "round2" in open(os.path.join(workdir, report.REPORT_MD)).read()


def test_resume_skips_every_finished_round(looped):
  cfg, workdir, _ = looped
  watched = [os.path.join(workdir, p) for p in ("mine/mined.jsonl", "round2/mine/mined.jsonl",
                                                "round2/calibrate/corrective.jsonl", "evaluate/round2/ranks_cirr.json")]
  before = [os.stat(p).st_mtime_ns for p in watched]
  out = main.run(cfg, workdir, STAGES)  # no stand-in needed: every stage's manifest exists
  assert list(out) == ["prepare", "adapt", "mine", "calibrate", "refine", "round2/mine", "round2/calibrate",
                       "round2/refine", "evaluate", "report"]
  assert [os.stat(p).st_mtime_ns for p in watched] == before


def test_evaluate_lists_unfinished_rounds(looped, tmp_path):
  cfg, workdir, _ = looped
  run_dir = str(tmp_path / "run")
  os.makedirs(run_dir)
  for stage in ("prepare", "adapt", "mine", "calibrate", "refine"):  # round 1 only
    os.symlink(os.path.join(workdir, stage), os.path.join(run_dir, stage))
  models, missing = evaluate.models_to_evaluate(cfg, run_dir)
  assert models == [("baseline", "adapt"), ("round1", "refine")] and missing == [2]
  assert common.latest_adapters(cfg, run_dir) == "refine" and common.latest_adapters(cfg, workdir) == "round2/refine"
