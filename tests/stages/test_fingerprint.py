"""Resume that knows what changed: stage fingerprints over the config fields a stage depends on, upstream run ids,
partial artifacts of another config, refuse / rerun, the config history, and manifests that name their file."""

import os
import shutil
import subprocess
import sys

import pytest

from configs import tiny
from recall_jax import main
from recall_jax.generate import prompt_files
from recall_jax.stages import artifacts, fingerprint


def _config():
  cfg = tiny.get_config()
  cfg.world.image_size = 56
  cfg.data.image_buckets = 56
  cfg.data.dataset = "cirr"
  return cfg


def _digests(cfg, workdir="/w"):
  return {s: fingerprint.digest(fingerprint.config_fields(cfg, workdir, s))
          for s in artifacts.expand_stages(list(fingerprint.ORDER), 2)}


def test_a_field_changes_its_stage_and_every_later_one_and_neutral_fields_change_none(tmp_path):
  base = _digests(_config())
  order = list(base)

  def changed(key, value):
    cfg = _config()
    *path, leaf = key.split(".")
    node = cfg
    for p in path:
      node = node[p]
    node[leaf] = value
    now = _digests(cfg)
    return [s for s in order if now[s] != base[s]]

  assert changed("world.seed", 7) == order
  assert changed("calibrate.vqa_threshold", 0.5) == order[order.index("calibrate"):]
  assert changed("seed", 3) == order[order.index("adapt"):]  # teach draws from teach.seed: F stays fixed
  assert changed("teach.seed", 3) == order[order.index("teach"):]
  assert changed("rounds", 2) == ["evaluate", "report"]
  assert changed("train.log_every", 3) == [] and changed("mine.sheet_queries", 1) == []
  assert changed("mesh.shape", (2, 4, 1)) == []  # sharded == unsharded
  prompts = tmp_path / "prompts"
  shutil.copytree(prompt_files.PACKAGED_DIR, prompts)
  cfg = _config()
  cfg.calibrate.prompt_dir = str(prompts)
  before = _digests(cfg)
  (prompts / "verify.txt").write_text((prompts / "verify.txt").read_text() + " Be strict.")
  after = _digests(cfg)
  assert [s for s in order if after[s] != before[s]] == order  # an edited template: the world BPE and F read it
  assert changed("calibrate.prompt_mode", "staged_cot") == order
  fields = fingerprint.config_fields(_config(), "/w", "prepare")
  assert fields["model.checkpoint"] == os.path.realpath("/w/prepare/checkpoint")  # "" names prepare's tiny base


def _fake(workdir, stage, current, on_change="refuse", crash=False):
  def fn(out):
    with open(os.path.join(out, "partial.txt"), "a") as f:
      f.write("x")
    if crash:
      raise RuntimeError("simulated crash")
    return {"outputs": {}}
  return artifacts.run_stage(workdir, stage, fn, log=lambda m: None, current=current, on_change=on_change)


def test_partial_artifacts_of_another_config_are_refused_or_moved_aside(tmp_path):
  wd = str(tmp_path)
  a = artifacts.provenance(wd, "calibrate", {"calibrate.vqa_threshold": 0.95}, [])
  b = artifacts.provenance(wd, "calibrate", {"calibrate.vqa_threshold": 0.5}, [])
  with pytest.raises(RuntimeError, match="simulated crash"):
    _fake(wd, "calibrate", a, crash=True)
  with pytest.raises(artifacts.StaleStageError, match=r"\(partial\) config calibrate.vqa_threshold: 0.95 -> 0.5"):
    _fake(wd, "calibrate", b)
  _fake(wd, "calibrate", a)  # the same config resumes the partial work
  with open(os.path.join(wd, "calibrate", "partial.txt")) as f:
    assert f.read() == "xx"
  manifest = _fake(wd, "calibrate", b, on_change="rerun")  # done with a: moved aside, redone with b
  assert manifest["config_fields"] == {"calibrate.vqa_threshold": 0.5}
  with open(os.path.join(wd, "calibrate", "partial.txt")) as f:
    assert f.read() == "x"
  (old,) = os.listdir(os.path.join(wd, artifacts.SUPERSEDED))
  assert artifacts.read_manifest(os.path.join(wd, artifacts.SUPERSEDED), old)["config_fields"] == a["config_fields"]


def test_a_rerun_upstream_stage_makes_its_dependants_stale(tmp_path):
  wd = str(tmp_path)
  first = _fake(wd, "prepare", artifacts.provenance(wd, "prepare", {"world.seed": 0}, []))
  teach = _fake(wd, "teach", artifacts.provenance(wd, "teach", {"teach.steps": 1}, ["prepare"]))
  assert teach["inputs"] == {"prepare": first["run_id"]}
  again = artifacts.provenance(wd, "teach", {"teach.steps": 1}, ["prepare"])
  assert artifacts.check_stage(wd, "teach", again) == []
  _fake(wd, "prepare", artifacts.provenance(wd, "prepare", {"world.seed": 1}, []), on_change="rerun")
  now = artifacts.provenance(wd, "teach", {"teach.steps": 1}, ["prepare"])
  assert artifacts.check_stage(wd, "teach", now) == ["input stage 'prepare' was rerun since"]


def test_main_refuses_a_changed_world_before_anything_runs_and_reruns_on_request(tmp_path):
  wd = str(tmp_path / "run")
  cfg = _config()
  first = main.run(cfg, wd, ["prepare"])["prepare"]
  assert main.run(cfg, wd, ["prepare"])["prepare"]["run_id"] == first["run_id"]  # unchanged: skipped
  assert main.run(_with(cfg, train__log_every=7), wd, ["prepare"])["prepare"]["run_id"] == first["run_id"]
  changed = _with(cfg, world__seed=5)
  with open(os.path.join(wd, "config.json")) as f:
    before = f.read()
  with pytest.raises(artifacts.StaleStageError, match=r"prepare: config world.seed: 0 -> 5.*--on_change=rerun"):
    main.run(changed, wd, ["prepare"])
  with open(os.path.join(wd, "config.json")) as f:
    assert f.read() == before  # nothing ran, nothing was overwritten
  second = main.run(changed, wd, ["prepare"], on_change="rerun")["prepare"]
  assert second["run_id"] != first["run_id"] and second["config_fields"]["world.seed"] == 5
  assert len(os.listdir(os.path.join(wd, artifacts.SUPERSEDED))) == 1
  with pytest.raises(artifacts.StaleStageError,
                     match=r"prepare \(an input of this run\): config world.seed: 5 -> 6\. Add it to --stages"):
    main.run(_with(cfg, world__seed=6), wd, ["teach"], on_change="rerun")  # teach would read the old world
  history = artifacts.read_jsonl(os.path.join(wd, "config_history.jsonl"))
  assert [h["config"]["world"]["seed"] for h in history] == [0, 0, 0, 5]


def _with(cfg, **overrides):
  out = cfg.copy_and_resolve_references()
  for key, value in overrides.items():
    section, leaf = key.split("__")
    out[section][leaf] = value
  return out


def test_a_corrupt_manifest_names_its_file(tmp_path):
  path = tmp_path / "adapt" / artifacts.MANIFEST
  path.parent.mkdir()
  path.write_text("")
  with pytest.raises(ValueError, match=f"{path}: the manifest of stage 'adapt' is not valid JSON"):
    artifacts.read_manifest(str(tmp_path), "adapt")
  path.write_text("[1]")
  with pytest.raises(ValueError, match="not a JSON object"):
    artifacts.read_manifest(str(tmp_path), "adapt")


def test_main_without_config_says_it_is_required(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "recall_jax.main", "--workdir", str(tmp_path)],
                        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                            os.path.abspath(__file__)))))
  assert proc.returncode != 0
  assert "--config is required" in proc.stderr
