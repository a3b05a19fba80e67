"""A stage runs once: its manifest marks it done; a stage that crashes leaves no manifest and reruns."""

import json

import pytest

from recall_jax.stages import artifacts


def test_stage_runs_once_and_crash_leaves_it_unfinished(tmp_path):
  calls = []

  def crashing(out):
    calls.append("crash")
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError):
    artifacts.run_stage(str(tmp_path), "mine", crashing, log=lambda _: None)
  assert not artifacts.is_done(str(tmp_path), "mine")

  def ok(out):
    calls.append("ok")
    artifacts.write_jsonl(f"{out}/x.jsonl", [{"a": 1}, {"a": 2}])
    return {"count": 2}

  m1 = artifacts.run_stage(str(tmp_path), "mine", ok, log=lambda _: None)
  m2 = artifacts.run_stage(str(tmp_path), "mine", ok, log=lambda _: None)
  assert calls == ["crash", "ok"] and m1["count"] == m2["count"] == 2
  assert artifacts.read_jsonl(str(tmp_path / "mine" / "x.jsonl")) == [{"a": 1}, {"a": 2}]


def test_read_jsonl_names_file_and_line(tmp_path):
  p = tmp_path / "bad.jsonl"
  p.write_text('{"a": 1}\n{oops\n')
  with pytest.raises(ValueError, match=r"bad.jsonl: line 2"):
    artifacts.read_jsonl(str(p))
  with pytest.raises(FileNotFoundError, match="has not finished"):
    artifacts.read_manifest(str(tmp_path), "calibrate")
  assert json.loads(artifacts.atomic_write_json(str(tmp_path / "m.json"), {"b": 2}) and (tmp_path / "m.json").read_text()) == {"b": 2}


def test_round_stage_names_are_their_folders():
  assert [artifacts.round_stage("mine", r) for r in (1, 2, 3)] == ["mine", "round2/mine", "round3/mine"]
  assert artifacts.stage_dir("/w", artifacts.round_stage("refine", 2)) == "/w/round2/refine"
  assert artifacts.parse_stage("round2/calibrate") == ("calibrate", 2)
  assert artifacts.parse_stage("mine") == ("mine", 1) and artifacts.parse_stage("adapt") == ("adapt", 0)
  for bad in ("round1/mine", "round2/adapt"):
    with pytest.raises(ValueError, match="round folders"):
      artifacts.parse_stage(bad)
  with pytest.raises(ValueError, match="not a round stage"):
    artifacts.round_stage("adapt", 2)


def test_expand_stages_repeats_the_round_block():
  demo = "prepare,teach,adapt,mine,calibrate,refine,evaluate,report".split(",")
  assert artifacts.expand_stages(demo, 1) == demo
  assert artifacts.expand_stages(demo, 2) == [
      "prepare", "teach", "adapt", "mine", "calibrate", "refine", "round2/mine", "round2/calibrate",
      "round2/refine", "evaluate", "report"]
  assert artifacts.expand_stages(["mine"], 3) == ["mine", "round2/mine", "round3/mine"]  # a plain name: every round
  assert artifacts.expand_stages(["round2/mine", "evaluate"], 2) == ["round2/mine", "evaluate"]
  assert artifacts.expand_stages(["prepare", "evaluate"], 2) == ["prepare", "evaluate"]
  with pytest.raises(ValueError, match="must be adjacent"):
    artifacts.expand_stages(["mine", "evaluate", "refine"], 2)
  with pytest.raises(ValueError, match="config rounds"):
    artifacts.expand_stages(demo, 0)


def test_resume_is_per_round_folder(tmp_path):
  calls = []
  for stage in ("mine", "round2/mine", "mine"):
    artifacts.run_stage(str(tmp_path), stage, lambda out, s=stage: calls.append(s) or {"stage": s},
                        log=lambda _: None)
  assert calls == ["mine", "round2/mine"]
  assert artifacts.read_manifest(str(tmp_path), "round2/mine")["stage"] == "round2/mine"
  assert (tmp_path / "round2" / "mine" / artifacts.MANIFEST).exists()
