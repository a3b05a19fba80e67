"""The ablation study's orchestration on the tiny world with one seed and two steps per training: shared stages
computed once and linked, the "+ CoT generation" row re-filtering the full row's generations, the hard-negative row
on the full row's mining, results equal to each row's evaluate manifest, the three output files, and resume."""

import json
import os

import numpy as np
import pytest

from configs import study as study_config
from configs import tiny
from recall_jax import study
from recall_jax.stages import artifacts, calibrate, mine

ROWS = ("baseline", "full", "cot", "hard_negative", "two_rounds")


def _config():
  """The study's rows on the test-scale pipeline (configs/tiny.py: untaught F, no teach stage)."""
  cfg = tiny.get_config()
  with cfg.unlocked():
    cfg.study = study_config.get_config().study
  cfg.study.seeds = (3,)
  cfg.study.rows = ROWS
  cfg.eval.foundation_verification = False
  cfg.world.image_size = 56
  cfg.data.image_buckets = 56
  cfg.data.dataset = "cirr"  # one split: the cheapest layout for five trainings
  cfg.train.steps = cfg.refine.steps = 2
  cfg.refine.infonce_weight = 1.0  # as adapt's: the no-triplet rows then reuse adapt's compiled step
  cfg.train.global_batch_size = 8  # one example per test device
  cfg.train.log_every = cfg.train.checkpoint_every = cfg.train.eval_every = 2
  cfg.train.best_metric = "R@1"
  cfg.train.data_threads = 1
  cfg.lora.rank = 4
  cfg.eval.batch_size = 8
  cfg.eval.sheet_queries = 1
  cfg.mine.batch_size = 8
  cfg.mine.sheet_queries = 1
  # The oracle writes parseable rewrites, so the VQA filter (random F: P(yes) far from 1) has something to drop.
  cfg.calibrate.rewriter = "oracle"
  cfg.calibrate.batch_size = 4
  cfg.calibrate.max_records = 4
  cfg.calibrate.sheet_samples = 1
  return cfg


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
  """The study run once; what it asked main.run for, in order. The rows' trainings compile the same step: a
  persistent compilation cache for this module keeps that to one compilation."""
  import jax
  workdir = str(tmp_path_factory.mktemp("study"))
  calls = []

  def run_fn(cfg, wd, stages):
    from recall_jax import main
    calls.append((os.path.relpath(wd, workdir), tuple(stages)))
    return main.run(cfg, wd, stages)

  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  before = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], str(tmp_path_factory.mktemp("jit_cache")))
  jax.config.update(keys[1], 0.5)
  try:
    result = study.run(_config(), workdir, run_fn=run_fn)
  finally:
    for k, v in before.items():
      jax.config.update(k, v)
  return workdir, result, calls


def test_shared_stages_run_once_and_are_linked(ran):
  workdir, _, calls = ran
  assert calls[:2] == [("shared", ("prepare",)), ("seed3/baseline", ("adapt", "evaluate"))]
  ran_stages = [(wd, s) for wd, stages in calls for s in stages]
  assert len(ran_stages) == len(set(ran_stages))
  assert sum(s == "adapt" for _, s in ran_stages) == 1 and sum(s == "mine" for _, s in ran_stages) == 1
  seed = os.path.join(workdir, "seed3")
  for row in ROWS:
    assert os.path.realpath(os.path.join(seed, row, "prepare")) == os.path.join(workdir, "shared", "prepare")
  for row in ("full", "cot", "hard_negative"):
    assert os.path.realpath(os.path.join(seed, row, "adapt")) == os.path.join(seed, "baseline", "adapt")
  for row in ("cot", "hard_negative"):
    assert os.path.realpath(os.path.join(seed, row, "mine")) == os.path.join(seed, "full", "mine")
  assert not os.path.islink(os.path.join(seed, "cot", "calibrate"))
  config = json.load(open(os.path.join(seed, "cot", "config.json")))
  assert config["seed"] == 3 and config["calibrate"]["vqa_filter"] is False and config["refine"]["grouped"] is False
  assert config["model"]["checkpoint"] == os.path.join(workdir, "shared", "prepare", "checkpoint")


def test_cot_row_refilters_the_full_rows_generations(ran):
  workdir, _, _ = ran
  seed = os.path.join(workdir, "seed3")
  read = lambda row, name: artifacts.read_jsonl(os.path.join(seed, row, "calibrate", name))
  full, cot = read("full", calibrate.GENERATIONS), read("cot", calibrate.GENERATIONS)
  assert [s["raw_generation"] for s in cot] == [s["raw_generation"] for s in full]
  assert [s["p_yes"] for s in cot] == [s["p_yes"] for s in full]
  parsed = [s["id"] for s in full if s["text"] is not None]
  assert parsed and [c["id"] for c in read("cot", calibrate.CORRECTIVE)] == parsed
  assert [c["id"] for c in read("full", calibrate.CORRECTIVE)] == [s["id"] for s in full if s["vqa_pass"]]
  assert len(read("full", calibrate.CORRECTIVE)) < len(parsed)  # the filter dropped some: the rows differ
  refined = {row: artifacts.read_manifest(os.path.join(seed, row), "refine") for row in ("full", "cot")}
  assert refined["cot"]["corrective_triplets"] == len(parsed) and not refined["cot"]["grouped"]
  assert refined["full"]["grouped"] and refined["full"]["triplet_weight"] > 0


def test_hard_negative_row_uses_the_full_rows_mining(ran):
  workdir, _, _ = ran
  seed = os.path.join(workdir, "seed3")
  mined = artifacts.read_jsonl(os.path.join(seed, "full", "mine", mine.MINED))
  refined = artifacts.read_manifest(os.path.join(seed, "hard_negative"), "refine")
  assert refined["mode"] == "hard_negative" and refined["hard_negatives"] == len(mined) > 0
  assert refined["corrective_triplets"] == 0 and not artifacts.is_done(os.path.join(seed, "hard_negative"),
                                                                       "calibrate")


def test_two_rounds_row_continues_the_full_rows_round(ran):
  workdir, _, _ = ran
  seed = os.path.join(workdir, "seed3")
  for stage in ("mine", "calibrate", "refine"):
    assert os.path.realpath(os.path.join(seed, "two_rounds", stage)) == os.path.join(seed, "full", stage)
  mined = artifacts.read_manifest(os.path.join(seed, "two_rounds"), "round2/mine")
  assert mined["retriever_adapters"] == os.path.join(seed, "full", "refine", "adapters")
  evaluation = artifacts.read_manifest(os.path.join(seed, "two_rounds"), "evaluate")
  assert set(evaluation["metrics"]) == {"baseline", "round1", "round2"}


def test_results_and_outputs(ran):
  workdir, result, _ = ran
  assert [r["name"] for r in result["rows"]] == list(ROWS)
  for r in result["rows"]:
    evaluation = artifacts.read_manifest(os.path.join(workdir, "seed3", r["name"]), "evaluate")
    summary = evaluation["metrics"][r["model"]]
    assert r["mean"]["headline/R@10"] == pytest.approx(summary["cirr"]["R@10"])
    assert r["mean"]["cirr/R@1"] == pytest.approx(summary["cirr"]["R@1"])
    assert all(v == 0.0 for v in r["std"].values())  # one seed
  assert [r["model"] for r in result["rows"]] == ["baseline", "round1", "round1", "round1", "round2"]
  on_disk = json.load(open(os.path.join(workdir, study.STUDY_JSON)))
  assert on_disk["rows"] == json.loads(json.dumps(result["rows"]))
  md = open(os.path.join(workdir, study.STUDY_MD)).read()
  assert md.count("\n| Table") >= 3 and "± 0.00" in md and "`refine.mode=hard_negative`" in md
  assert os.path.getsize(os.path.join(workdir, study.STUDY_PNG)) > 2000


def test_resume_runs_nothing_again(ran):
  workdir, result, _ = ran
  stamps = {p: os.stat(p).st_mtime_ns for p in _manifests(workdir)}
  again = study.run(_config(), workdir)
  assert {p: os.stat(p).st_mtime_ns for p in _manifests(workdir)} == stamps
  assert again["rows"] == result["rows"]


def _manifests(workdir):
  return [os.path.join(d, f) for d, _, fs in os.walk(workdir) for f in fs if f == artifacts.MANIFEST]


def _fake_run(workdir, calls):
  """A main.run stand-in that only writes manifests (metrics for every model tag): the orchestration alone."""
  def run_fn(cfg, wd, stages):
    calls.append((os.path.relpath(wd, workdir), tuple(stages), cfg.seed))
    for stage in stages:
      out = artifacts.stage_dir(wd, stage)
      os.makedirs(out, exist_ok=True)
      manifest = {"seconds": 1.0}
      if stage.endswith("calibrate"):
        manifest["outputs"] = {"generations": os.path.join(out, calibrate.GENERATIONS)}
        open(manifest["outputs"]["generations"], "w").write(json.dumps({"id": wd}) + "\n")
      if stage == "evaluate":
        manifest["metrics"] = {m: {"cirr": {"R@1": cfg.seed + k, "R@10": 10.0 * k}}
                               for k, m in enumerate(("baseline", "round1", "round2"))}
      artifacts.atomic_write_json(os.path.join(out, artifacts.MANIFEST), manifest)
  return run_fn


def test_every_row_runs_its_own_stages_once_after_its_donors(tmp_path):
  workdir, calls = str(tmp_path), []
  cfg = _config()
  cfg.study.seeds = (0, 1)
  cfg.study.rows = ("two_rounds", "cot", "vqa", "random_mining", "oracle_f", "originals", "hard_negative",
                    "baseline", "full")  # dependents before their donors: the donors' stages run first anyway
  result = study.run(cfg, workdir, run_fn=_fake_run(workdir, calls))
  ran = [(wd, s) for wd, stages, _ in calls for s in stages]
  assert len(ran) == len(set(ran)) and ran[0] == ("shared", "prepare")
  for seed in (0, 1):
    order = [(wd.split("/")[1], s) for wd, s in ran if wd.startswith(f"seed{seed}/")]
    assert order[:4] == [("baseline", "adapt"), ("full", "mine"), ("full", "calibrate"), ("full", "refine")]
    for name, row in study.ROWS.items():
      assert [s for r, s in order if r == name] == list(row.stages), name
      for stage, donor in row.borrow.items():
        link = os.path.join(workdir, f"seed{seed}", name, stage)
        assert os.path.realpath(link) == os.path.join(workdir, f"seed{seed}", donor, stage), (name, stage)
  assert {seed for wd, _, seed in calls if wd.startswith("seed1/")} == {1}
  # The CoT row's calibrate starts from the full row's generations of the same seed.
  partial = os.path.join(workdir, "seed1", "cot", "calibrate", calibrate.PARTIAL)
  assert json.loads(open(partial).read())["id"] == os.path.join(workdir, "seed1", "full")
  means = {r["name"]: r["mean"] for r in result["rows"]}
  assert means["two_rounds"]["headline/R@10"] == 20.0 and means["baseline"]["headline/R@10"] == 0.0
  assert means["full"]["headline/R@1"] == pytest.approx(1.5)  # round1: seed + 1, over seeds 0 and 1
  assert {r["name"]: r["std"]["headline/R@1"] for r in result["rows"]}["full"] == pytest.approx(np.std([1, 2],
                                                                                                       ddof=1))


def test_aggregate_and_headline():
  mean, std = study.aggregate([{"a": 1.0, "b": 2.0}, {"a": 3.0}, {"a": 5.0, "b": 4.0}])
  assert mean == {"a": 3.0} and std == {"a": pytest.approx(2.0)}  # sample std; "b" is not in every seed
  fiq = {"fashioniq_dress": {"R@1": 1.0, "R@10": 9.0}, "fashioniq_average": {"mean_R@1": 2.0, "mean_R@10": 8.0}}
  assert study.headline(fiq) == {"R@10": 8.0, "R@1": 2.0}
  two = {"a": {"R@1": 1.0, "R@10": 3.0}, "b": {"R@1": 3.0, "R@10": 5.0}}
  assert study.headline(two) == {"R@10": 4.0, "R@1": 2.0}
  assert np.isclose(study.aggregate([{"x": 1.0}])[1]["x"], 0.0)


def test_study_config_selects_nothing_on_val():
  cfg = study_config.get_config()
  assert cfg.train.eval_every >= max(cfg.train.steps, cfg.refine.steps)  # only the final step is evaluated
  assert cfg.world.seed == 0 and list(cfg.study.seeds) == [0, 1, 2] and list(cfg.study.rows) == list(study.ROWS)
  for name in cfg.study.rows:  # every row's switches exist in the config
    study.row_config(cfg, study.ROWS[name], 0, None)


def test_config_errors_name_the_keys(tmp_path):
  cfg = _config()
  cfg.study.rows = ("baseline", "everything")
  with pytest.raises(ValueError, match="study.rows"):
    study.Study(cfg, str(tmp_path))
  with pytest.raises(KeyError, match="refine.nope"):
    study.row_config(_config(), study.Row("x", "x", "t", {"refine.nope": 1}, ("refine",), {}), 0, None)


def test_the_oracle_f_upper_bound_keeps_every_oracle_rewrite():
  cfg = study.row_config(_config(), study.ROWS["oracle_f"], 0, None)
  assert cfg.calibrate.rewriter == "oracle" and cfg.calibrate.vqa_filter is False
