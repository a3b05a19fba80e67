"""The main job end to end on the tiny synthetic world: results with protocol, pictures, and resume by manifest."""

import json
import os

import pytest

from configs import tiny as demo
from recall_jax import main


def _config():
  cfg = demo.get_config()
  cfg.world.scale = "tiny"
  cfg.world.image_size = 56
  cfg.data.image_buckets = 56
  cfg.eval.sheet_queries = 2
  return cfg


def test_prepare_and_evaluate_then_resume(tmp_path):
  workdir = str(tmp_path / "run")
  out = main.run(_config(), workdir, ["prepare", "evaluate"])
  metrics = out["evaluate"]["metrics"]
  assert set(metrics) == {"base"}  # before Stage 1: the foundation model alone
  assert set(metrics["base"]) == {"fashioniq_dress", "fashioniq_shirt", "fashioniq_toptee", "fashioniq_average"}
  assert out["evaluate"]["missing_rounds"] == [1]
  for cat in ("dress", "shirt", "toptee"):
    res = json.load(open(os.path.join(workdir, "evaluate", "base", f"results_fashioniq_{cat}.json")))
    assert res["protocol"]["exclude_reference"] is True and res["protocol"]["caption_join"] == "and"
    assert res["checkpoint"].endswith("prepare/checkpoint")
    assert list(res["metrics"]) == ["R@1", "R@5", "R@10", "R@50"]
    assert 0.0 <= res["metrics"]["R@1"] <= res["metrics"]["R@10"] <= res["metrics"]["R@50"] <= 100.0
    assert os.path.getsize(os.path.join(workdir, "evaluate", "base", f"retrievals_fashioniq_{cat}.png")) > 1000
    verify = out["evaluate"]["foundation_verification"]["splits"][f"fashioniq_{cat}"]
    assert verify["queries"] == 4 and os.path.exists(verify["path"])
  assert json.load(open(os.path.join(workdir, "config.json")))["world"]["scale"] == "tiny"

  # A second run finds both manifests and redoes nothing: the results file is untouched.
  path = os.path.join(workdir, "evaluate", "base", "results_fashioniq_dress.json")
  before = os.stat(path).st_mtime_ns
  again = main.run(_config(), workdir, ["prepare", "evaluate"])
  assert os.stat(path).st_mtime_ns == before and again["evaluate"]["metrics"] == metrics


def test_stage_names_are_checked_before_anything_runs(tmp_path):
  cfg = _config()
  with pytest.raises(ValueError, match="unknown stage 'mine2'"):
    main.run(cfg, str(tmp_path / "a"), ["prepare", "mine2"])
  with pytest.raises(ValueError, match="beyond config rounds = 1"):
    main.run(cfg, str(tmp_path / "b"), ["prepare", "round2/mine"])
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
