"""Stage 4's training set per config refine.mode / refine.grouped, on the tiny world with the trainer stubbed out:
corrective triplets join their groups, "originals" uses none of them, "hard_negative" adds the mined instances as
negative-only slots, and plain batches turn the triplet loss off."""

import os

import pytest

from configs import tiny as demo
from recall_jax import main
from recall_jax.stages import artifacts, common, refine


def _config():
  cfg = demo.get_config()
  cfg.world.scale = "tiny"
  cfg.world.image_size = 56
  cfg.data.image_buckets = 56
  cfg.data.dataset = "cirr"
  return cfg


def _write_stage(workdir, stage, manifest, name=None, records=()):
  out = artifacts.stage_dir(workdir, stage)
  os.makedirs(out, exist_ok=True)
  if name:
    path = os.path.join(out, name)
    artifacts.write_jsonl(path, records)
    manifest = {**manifest, "outputs": {name.split(".")[0]: path}}
  artifacts.atomic_write_json(os.path.join(out, artifacts.MANIFEST), manifest)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """prepare done; adapt, mine and calibrate manifests written by hand: 3 mined instances, 2 kept rewrites."""
  workdir = str(tmp_path_factory.mktemp("refine"))
  cfg = _config()
  main.run(cfg, workdir, ["prepare"])
  split = common.read_splits(cfg, workdir, "train")[0]
  _write_stage(workdir, "adapt", {"adapter_dir": os.path.join(workdir, "adapt", "adapters")})
  mined = []
  for q in split.queries[:3]:
    instance = next(n for n in split.gallery if n not in (q.reference, q.target))
    mined.append({"id": f"{q.qid}#{instance}", "qid": q.qid, "reference": q.reference, "captions": list(q.captions),
                  "text": " and ".join(q.captions), "targets": list(q.targets), "instance": instance,
                  "group": q.group_key, "category": q.category})
  _write_stage(workdir, "mine", {}, "mined.jsonl", mined)
  corrective = [{**r, "captions": [f"rewrite {k}"], "targets": [r["instance"]]} for k, r in enumerate(mined[:2])]
  _write_stage(workdir, "calibrate", {}, "corrective.jsonl", corrective)
  return workdir, split, mined


@pytest.fixture
def trained(monkeypatch, tmp_path):
  """Runs refine with the model load and the trainer stubbed: returns what the trainer was given."""
  calls = []
  monkeypatch.setattr(common, "load_base_model", lambda *a, **k: (None, None))
  monkeypatch.setattr(refine.peft_io, "import_peft", lambda model, path, names: None)

  def train_on(cfg, workdir, out, queries, images, *, grouped, model=None, tokenizer=None, mesh=None, loop, loss):
    calls.append({"loop": loop, "loss": loss, "queries": list(queries), "grouped": grouped})
    return {"adapter_dir": os.path.join(out, "adapters")}

  monkeypatch.setattr(refine.adapt, "train_on", train_on)

  def run(workdir, **overrides):
    cfg = _config()
    for key, value in overrides.items():
      setattr(cfg.refine, key, value)
    manifest = refine.run(cfg, workdir, str(tmp_path / f"out{len(calls)}"))
    return manifest, calls[-1]

  return run


def test_corrective_mode_adds_the_kept_rewrites_to_their_groups(workdir, trained):
  workdir, split, mined = workdir
  manifest, call = trained(workdir)
  extra = call["queries"][len(split.queries):]
  assert call["queries"][:len(split.queries)] == list(split.queries)
  assert [q.captions for q in extra] == [("rewrite 0",), ("rewrite 1",)]
  assert [q.group_key for q in extra] == [split.queries[0].group_key, split.queries[1].group_key]
  assert not any(q.negative_only for q in extra) and [q.target for q in extra] == [r["instance"] for r in mined[:2]]
  assert call["grouped"] and call["loss"].triplet_weight == pytest.approx(0.1)
  r = _config().refine  # refine's weights and margin, Stage 1's temperature
  assert (call["loss"].infonce_weight, call["loss"].margin) == (r.infonce_weight, r.margin) != (
      _config().loss.infonce_weight, _config().loss.margin)
  assert call["loss"].temperature == _config().loss.temperature
  assert (manifest["mode"], manifest["corrective_triplets"], manifest["hard_negatives"]) == ("corrective", 2, 0)


def test_originals_mode_uses_no_corrective_triplets(workdir, trained):
  workdir, split, _ = workdir
  manifest, call = trained(workdir, mode="originals")
  assert call["queries"] == list(split.queries)
  assert (manifest["mode"], manifest["corrective_triplets"], manifest["original_triplets"]) == (
      "originals", 0, len(split.queries))
  assert call["loop"].steps == _config().refine.steps  # the same steps: only the signal differs


def test_hard_negative_mode_adds_negative_only_instances(workdir, trained):
  workdir, split, mined = workdir
  manifest, call = trained(workdir, mode="hard_negative")
  extra = call["queries"][len(split.queries):]
  assert len(extra) == len(mined) == manifest["hard_negatives"] and manifest["corrective_triplets"] == 0
  for q, r, original in zip(extra, mined, split.queries):
    assert q.negative_only and q.target == r["instance"]
    # Nothing rewritten: the original query's reference and text, in its micro-group.
    assert (q.reference, q.captions, q.group_key) == (original.reference, original.captions, original.group_key)


def test_plain_batches_turn_the_triplet_loss_off(workdir, trained):
  workdir, _, _ = workdir
  manifest, call = trained(workdir, grouped=False)
  assert not call["grouped"] and call["loss"].triplet_weight == 0.0
  assert not manifest["grouped"] and manifest["triplet_weight"] == 0.0


def test_unknown_mode_names_the_config_key(workdir, trained):
  with pytest.raises(ValueError, match="refine.mode"):
    trained(workdir[0], mode="both")
