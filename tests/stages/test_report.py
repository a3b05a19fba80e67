"""The report from two result sets (baseline and round 1) in hand-made manifests: metrics and means, Fig. 1 figures
computed by hand, Stage 2/3 counts, F's quality, time per stage; missing optional parts are named, stale files fail."""

import json
import os

import pytest

from configs import tiny as demo
from recall_jax.stages import artifacts, report

CATS = ("dress", "shirt", "toptee")
P_YES = {"q0": 0.99, "q1": 0.97, "q2": 0.1, "q3": 0.5}  # F verifies q0, q1 (threshold 0.95)
RANKS = {"baseline": {"q0": 1, "q1": 3, "q2": 1, "q3": None}, "round1": {"q0": 1, "q1": 1, "q2": 2, "q3": 1}}


def _done(workdir, stage, manifest):
  out = artifacts.stage_dir(workdir, stage)
  os.makedirs(out, exist_ok=True)
  artifacts.atomic_write_json(os.path.join(out, artifacts.MANIFEST), manifest)


def _metrics(ranks, offset):
  r1 = 100.0 * sum(r == 1 for r in ranks.values()) / len(ranks)
  return {"R@1": r1, "R@5": r1 + offset, "R@10": 80.0 + offset, "R@50": 100.0}


def _workdir(tmp_path, teach=True, verification=True):
  workdir = str(tmp_path)
  models, verify = {}, {}
  for tag, ranks in RANKS.items():
    out = os.path.join(workdir, "evaluate", tag)
    os.makedirs(out)
    metrics = {}
    for k, cat in enumerate(CATS):
      artifacts.atomic_write_json(os.path.join(out, f"ranks_fashioniq_{cat}.json"), {"ranks": ranks, "top_k": 50})
      metrics[f"fashioniq_{cat}"] = _metrics(ranks, offset=k)
    metrics["fashioniq_average"] = {"mean_R@10": 81.0, "mean_R@50": 100.0, "avg": 90.5}
    models[tag] = {"stage": "adapt" if tag == "baseline" else "refine", "dir": out, "metrics": metrics}
  for cat in CATS:
    path = os.path.join(workdir, "evaluate", "foundation", f"verify_fashioniq_{cat}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    artifacts.atomic_write_json(path, {"p_yes": P_YES, "threshold": 0.95})
    verify[f"fashioniq_{cat}"] = {"queries": 4, "verified": 2, "path": path}
  _done(workdir, "evaluate", {
      "split": "val", "models": models, "metrics": {t: m["metrics"] for t, m in models.items()}, "seconds": 9.0,
      "missing_rounds": [],
      "foundation_verification": {"checkpoint": "/f", "threshold": 0.95, "splits": verify} if verification else None})
  for stage, seconds in (("prepare", 1.0), ("adapt", 2.0)):
    _done(workdir, stage, {"seconds": seconds})
  _done(workdir, "mine", {"queries": 1050, "failures": 700, "failure_rate": 2 / 3, "instances": 700,
                          "instances_per_failing_query": 1.0, "retriever_adapters": "/adapt", "seconds": 3.0})
  _done(workdir, "calibrate", {"max_records": 0, "vqa_threshold": 0.95, "seconds": 4.0, "statistics": {
      "mined": 700, "generated": 700, "parsed": 600, "rejected": 100, "kept": 500, "dropped_by_vqa": 100,
      "keep_rate": 5 / 7, "oracle": {"judged": 600, "rewrite_accuracy": 0.8, "vqa_agreement": 0.85,
                                     "precision_of_kept": 0.9, "precision_of_dropped": 0.3}}})
  _done(workdir, "refine", {"steps": 150, "corrective_triplets": 500, "original_triplets": 1050,
                            "initialised_from": "/adapt", "adapter_dir": "/refine", "seconds": 5.0})
  if teach:
    _done(workdir, "teach", {"checkpoint": "/f", "seconds": 6.0,
                             "quality": {"vqa_accuracy": 0.9, "verify_agreement": 0.8}})
  return workdir


def test_report_from_two_result_sets(tmp_path):
  cfg = demo.get_config()
  workdir = _workdir(tmp_path)
  manifest = report.run(cfg, workdir, os.path.join(workdir, "report"))
  rep = json.load(open(os.path.join(workdir, report.REPORT_JSON)))
  assert rep["warnings"] == [] == manifest["warnings"] and rep["refined_round"] == 1
  assert set(rep["baseline"]) == {"fashioniq_dress", "fashioniq_shirt", "fashioniq_toptee", "mean"}
  assert rep["baseline"]["fashioniq_shirt"] == {"R@1": 50.0, "R@5": 51.0, "R@10": 81.0, "R@50": 100.0}
  assert rep["refined"]["mean"] == pytest.approx({"R@1": 75.0, "R@5": 76.0, "R@10": 81.0, "R@50": 100.0})
  assert manifest["metrics"]["refined"]["R@1"] == pytest.approx(75.0)

  # Fig. 1: baseline hits q0 and q2, round 1 hits q0, q1, q3; F verifies q0 and q1.
  pooled = rep["fig1"]["pooled"]
  assert (pooled["queries"], pooled["verified"]) == (12, 6)
  assert pooled["R@1"]["baseline"] == {"all": 50.0, "verified": 50.0, "rejected": 50.0}
  assert pooled["R@1"]["round1"] == {"all": 75.0, "verified": 100.0, "rejected": 50.0}
  assert rep["fig1"]["splits"]["fashioniq_dress"]["verified_but_missed"] == {"baseline": 1, "round1": 0}

  assert rep["mining"]["round1"]["failures"] == 700 and rep["rounds"][0]["mined_with"] == "/adapt"
  cal = rep["calibration"]["round1"]
  assert (cal["generated"], cal["parsed"], cal["kept"], cal["dropped_by_vqa"]) == (700, 600, 500, 100)
  assert cal["oracle"]["precision_of_kept"] == 0.9 and cal["oracle"]["precision_of_dropped"] == 0.3
  assert rep["foundation"] == {"checkpoint": "/f", "taught": True,
                               "quality": {"vqa_accuracy": 0.9, "verify_agreement": 0.8}}
  assert rep["stage_seconds"] == {"prepare": 1.0, "teach": 6.0, "adapt": 2.0, "mine": 3.0, "calibrate": 4.0,
                                  "refine": 5.0, "evaluate": 9.0}
  md = open(os.path.join(workdir, report.REPORT_MD)).read()
  assert "| round1 | 75.00 | 100.00 | 50.00 |" in md and "precision dropped" in md
  assert os.path.getsize(os.path.join(workdir, report.REPORT_PNG)) > 10000


def test_missing_parts_are_named_not_guessed(tmp_path):
  cfg = demo.get_config()
  cfg.rounds = 2
  workdir = _workdir(tmp_path, teach=False, verification=False)
  rep = report.build(cfg, workdir)
  assert rep["fig1"] is None and rep["foundation"]["taught"] is False and rep["foundation"]["quality"] is None
  assert rep["refined_round"] == 1 and [r["finished"]["mine"] for r in rep["rounds"]] == [True, False]
  assert any("round 2" in w for w in rep["warnings"]) and any("Fig. 1" in w for w in rep["warnings"])
  report.picture(rep, str(tmp_path / "partial.png"))  # draws without the optional panels


def test_stale_ranks_are_an_error(tmp_path):
  workdir = _workdir(tmp_path)
  path = os.path.join(workdir, "evaluate", "round1", "ranks_fashioniq_dress.json")
  artifacts.atomic_write_json(path, {"ranks": {**RANKS["round1"], "q1": 4}})
  with pytest.raises(ValueError, match="R@1 from the ranks"):
    report.build(demo.get_config(), workdir)
  artifacts.atomic_write_json(path, {"ranks": {"q0": 1}})
  with pytest.raises(ValueError, match="queries differ"):
    report.build(demo.get_config(), workdir)
  os.remove(os.path.join(workdir, "evaluate", artifacts.MANIFEST))
  with pytest.raises(FileNotFoundError, match="evaluate"):
    report.build(demo.get_config(), workdir)
