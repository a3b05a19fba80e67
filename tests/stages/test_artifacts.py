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
