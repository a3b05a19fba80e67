"""The retriever starts from the foundation model F: teach's checkpoint once that stage has finished, prepare's (or
the configured one) before; adapters are only merged into the base they were trained on."""

import dataclasses
import os
import types

import pytest

from configs import tiny as demo
from recall_jax.models import family
from recall_jax.stages import artifacts, common, paths


def _done(workdir, stage, manifest):
  os.makedirs(artifacts.stage_dir(workdir, stage), exist_ok=True)
  artifacts.atomic_write_json(os.path.join(artifacts.stage_dir(workdir, stage), artifacts.MANIFEST), manifest)


def test_base_checkpoint_is_teach_once_it_has_finished(tmp_path, monkeypatch):
  workdir, cfg = str(tmp_path), demo.get_config()
  loaded = []
  model = types.SimpleNamespace(cfg=family.QWEN2_5_VL.tiny_config())
  fam = dataclasses.replace(family.QWEN2_5_VL, from_pretrained=lambda path, **kw: loaded.append(path) or model)
  monkeypatch.setattr(common.family, "of_checkpoint", lambda path, expected=None: fam)
  monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda path: "tokenizer")
  assert common.foundation_checkpoint(cfg, workdir) == paths.checkpoint_dir(cfg, workdir)
  common.load_base_model(cfg, workdir)
  _done(workdir, "teach", {"checkpoint": "/taught"})
  assert common.foundation_checkpoint(cfg, workdir) == "/taught"
  common.load_base_model(cfg, workdir)
  common.load_base_model(cfg, workdir, "/explicit")
  assert loaded == [paths.checkpoint_dir(cfg, workdir), "/taught", "/explicit"]
  # Mining before Stage 1: round 1 uses the base alone; round 2 needs round 1's refine.
  assert common.round_retriever(cfg, workdir, 1) == (model, "tokenizer", None)
  with pytest.raises(FileNotFoundError, match="'refine' has not finished"):
    common.round_retriever(cfg, workdir, 2)


def test_adapters_must_match_the_base_and_latest_is_round_aware(tmp_path):
  workdir, cfg = str(tmp_path), demo.get_config()
  cfg.rounds = 2
  assert common.latest_adapters(cfg, workdir) is None
  _done(workdir, "adapt", {"adapter_dir": "/a", "base_checkpoint": paths.checkpoint_dir(cfg, workdir)})
  assert common.latest_adapters(cfg, workdir) == "adapt"
  assert common.trained_adapters(cfg, workdir, "adapt") == "/a"
  _done(workdir, "refine", {"adapter_dir": "/r1"})
  _done(workdir, "round2/refine", {"adapter_dir": "/r2"})
  _done(workdir, "round3/refine", {"adapter_dir": "/stale"})  # beyond config rounds: ignored
  assert common.latest_adapters(cfg, workdir) == "round2/refine"
  assert common.finished_rounds(cfg, workdir) == [1, 2]
  assert [common.round_start_stage(r) for r in (1, 2, 3)] == ["adapt", "refine", "round2/refine"]
  # teach finishing after adapt: adapt's adapters belong to another base.
  _done(workdir, "teach", {"checkpoint": "/taught"})
  with pytest.raises(ValueError, match="rerun adapt"):
    common.trained_adapters(cfg, workdir, "adapt")
