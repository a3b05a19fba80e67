"""The main job end to end on the tiny synthetic world: results with protocol, pictures, and resume by manifest."""

import json
import os

from configs import demo
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
  assert set(metrics) == {"fashioniq_dress", "fashioniq_shirt", "fashioniq_toptee", "fashioniq_average"}
  for cat in ("dress", "shirt", "toptee"):
    res = json.load(open(os.path.join(workdir, "evaluate", f"results_fashioniq_{cat}.json")))
    assert res["protocol"]["exclude_reference"] is True and res["protocol"]["caption_join"] == "and"
    assert res["checkpoint"].endswith("prepare/checkpoint")
    assert 0.0 <= res["metrics"]["R@10"] <= res["metrics"]["R@50"] <= 100.0
    assert os.path.getsize(os.path.join(workdir, "evaluate", f"retrievals_fashioniq_{cat}.png")) > 1000
  assert json.load(open(os.path.join(workdir, "config.json")))["world"]["scale"] == "tiny"

  # A second run finds both manifests and redoes nothing: the results file is untouched.
  path = os.path.join(workdir, "evaluate", "results_fashioniq_dress.json")
  before = os.stat(path).st_mtime_ns
  again = main.run(_config(), workdir, ["prepare", "evaluate"])
  assert os.stat(path).st_mtime_ns == before and again["evaluate"]["metrics"] == metrics
