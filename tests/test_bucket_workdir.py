"""A gs:// workdir: the main job writes every artifact into the bucket, none into a local ./gs: folder, and a rerun
resumes from the bucket's manifests.

The bucket is faked at the filesystem layer the code goes through: etils.epath's backends (`epath.testing.mock_epath`,
gs://bucket/x -> <tmp>/bucket/x; like a bucket, no renames and no folders needed) and the GCS kvstore Orbax hands
to tensorstore (a file kvstore at the same place).
Code that bypassed epath (os.makedirs, open, os.path.abspath on the workdir) would write under the working
directory's gs: folder instead, which the test forbids."""

import contextlib
import json
import os
from unittest import mock

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils.epath import testing as epath_testing
from flax import nnx
from orbax.checkpoint._src.path import gcs_utils

from configs import tiny
from recall_jax import files, main
from recall_jax.models import lora, peft_io
from recall_jax.stages import artifacts
from recall_jax.train.checkpoint import Checkpoints
from recall_jax.train.logging import MetricWriter

BUCKET = "gs://bucket/runs/x"


@contextlib.contextmanager
def fake_gcs(root: str):
  """gs://<path> lives at <root>/<path> for every epath call and for Orbax's tensorstore; local paths as they are."""

  def local(p):
    p = os.fspath(p)
    return os.path.join(root, p[len("gs://"):]) if p.startswith("gs://") else p

  def remote(p):
    p = os.fspath(p)
    return "gs://" + os.path.relpath(p, root) if p == root or p.startswith(root + os.sep) else p

  def one(fn, p, *args, **kwargs):
    return fn(local(p), *args, **kwargs)

  def two(fn, a, b, *args, **kwargs):
    return fn(local(a), local(b), *args, **kwargs)

  def no_rename(fn, a, b):  # a bucket renames nothing: objects are copied and deleted
    if any(os.fspath(p).startswith("gs://") for p in (a, b)):
      raise OSError(f"rename {a} -> {b}: not in a bucket")
    return fn(a, b)

  def open_(fn, p, mode):
    if mode[0] in "wa":  # a bucket has no folders: an object can be written under any prefix
      os.makedirs(os.path.dirname(local(p)), exist_ok=True)
    return fn(local(p), mode)

  def glob(fn, pattern):
    return [remote(p) for p in fn(local(pattern))]

  def walk(fn, top, **kwargs):
    for folder, dirs, names in fn(local(top), **kwargs):
      yield remote(folder), dirs, names  # the same `dirs` list, so callers can prune it

  def kvstore(path):
    return {"driver": "file", "path": local(path)}

  with epath_testing.mock_epath(open=open_, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
                                rmtree=one, stat=one, rename=no_rename, replace=no_rename, copy=two, glob=glob, walk=walk), \
      mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore), \
      mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False):
    yield local


def _config():
  cfg = tiny.get_config()
  cfg.world.image_size = 56
  cfg.data.image_buckets = 56
  cfg.data.dataset = "cirr"
  cfg.eval.sheet_queries = 1
  return cfg


STAGES = ["prepare", "evaluate"]


def test_main_job_in_a_bucket_writes_there_and_resumes(tmp_path, monkeypatch):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)  # where a path that bypassed epath would land: ./gs:/bucket/...
  with fake_gcs(str(tmp_path / "gcs")) as local:
    out = main.run(_config(), BUCKET, STAGES)
    root = local(BUCKET)
    for rel in ("config.json", "config_history.jsonl", "prepare/manifest.json", "evaluate/manifest.json",
                "prepare/world/cirr/captions/cap.rc2.val.json", "prepare/checkpoint/model.safetensors",
                "prepare/checkpoint/tokenizer_config.json", "evaluate/base/results_cirr.json",
                "evaluate/base/ranks_cirr.json", "evaluate/base/retrievals_cirr.png"):
      assert os.path.isfile(os.path.join(root, rel)), rel
    # The stage's pictures went into its TensorBoard events, copied into the bucket.
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(root, "evaluate", "tensorboard")))
    # Paths recorded for later stages name the bucket, not a local folder.
    assert out["prepare"]["checkpoint"]["path"] == f"{BUCKET}/prepare/checkpoint"
    results = json.load(open(os.path.join(root, "evaluate", "base", "results_cirr.json")))
    assert results["checkpoint"] == f"{BUCKET}/prepare/checkpoint"
    assert os.listdir(cwd) == [], os.listdir(cwd)

    again = main.run(_config(), BUCKET, STAGES)  # both stages found done in the bucket: nothing runs again
    assert {s: m["run_id"] for s, m in again.items()} == {s: m["run_id"] for s, m in out.items()}
    assert len(files.read_text(f"{BUCKET}/config_history.jsonl").splitlines()) == 2
    assert os.listdir(cwd) == []


def test_a_stale_stage_in_a_bucket_moves_to_superseded(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)

  def fn(out):
    files.atomic_write_text(os.path.join(out, "part.txt"), "x")
    return {"outputs": {}}

  with fake_gcs(str(tmp_path / "gcs")) as local:
    a = artifacts.provenance(BUCKET, "calibrate", {"calibrate.vqa_threshold": 0.95}, [])
    b = artifacts.provenance(BUCKET, "calibrate", {"calibrate.vqa_threshold": 0.5}, [])
    first = artifacts.run_stage(BUCKET, "calibrate", fn, log=lambda m: None, current=a)
    second = artifacts.run_stage(BUCKET, "calibrate", fn, log=lambda m: None, current=b, on_change="rerun")
    assert second["run_id"] != first["run_id"]
    (old,) = os.listdir(local(f"{BUCKET}/{artifacts.SUPERSEDED}"))
    moved = artifacts.read_manifest(f"{BUCKET}/{artifacts.SUPERSEDED}", old)
    assert moved["run_id"] == first["run_id"]
    assert sorted(os.listdir(local(f"{BUCKET}/{artifacts.SUPERSEDED}/{old}"))) == ["manifest.json", "part.txt",
                                                                                  "started.json"]
    assert not os.path.exists(tmp_path / "gs:")


def test_training_checkpoints_and_metrics_in_a_bucket(tmp_path, monkeypatch):
  """What a training stage writes (trainer.fit): Orbax steps with the Grain iterator position, old steps deleted by
  the preservation policy, metrics.jsonl and TensorBoard events, all in the bucket and read back from it."""
  monkeypatch.chdir(tmp_path)
  with fake_gcs(str(tmp_path / "gcs")) as local:
    ckpt = Checkpoints(f"{BUCKET}/adapt/checkpoints", keep=1, best_metric="val/r1")
    data = grain.MapDataset.range(40).batch(4)
    it = iter(data)
    for step in (1, 2, 3):
      next(it)
      ckpt.save(step, {"w": jnp.full(3, float(step))}, data_iterator=it, metrics={"val/r1": [0.0, 0.9, 0.1][step - 1]})
    expected = next(it)
    assert sorted(os.listdir(local(f"{BUCKET}/adapt/checkpoints"))) == ["2", "3"]  # the newest and the best
    ckpt.close()
    again = Checkpoints(f"{BUCKET}/adapt/checkpoints", keep=1, best_metric="val/r1")
    assert again.latest_step() == 3 and again.best_step() == 2
    fresh = iter(data)
    state, meta = again.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, data_iterator=fresh)
    assert meta["step"] == 3 and np.asarray(state["w"]).tolist() == [3.0] * 3
    np.testing.assert_array_equal(next(fresh), expected)

    writer = MetricWriter(f"{BUCKET}/adapt")
    writer.write(1, {"loss": 2.0})
    writer.write(2, {"loss": 1.5})
    writer.close()
    lines = files.read_text(f"{BUCKET}/adapt/metrics.jsonl").splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    events = os.listdir(local(f"{BUCKET}/adapt/tensorboard"))
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    assert os.path.getsize(os.path.join(local(f"{BUCKET}/adapt/tensorboard"), events[0])) > 0
    assert not os.path.exists(tmp_path / "gs:")


class _Tiny(nnx.Module):

  def __init__(self, seed: int):
    self.proj = nnx.Linear(4, 4, rngs=nnx.Rngs(seed))


def test_peft_adapters_round_trip_through_a_bucket(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with fake_gcs(str(tmp_path / "gcs")) as local:
    model = _Tiny(0)
    lora.apply_lora(model, "proj", rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    model.proj.lora_b.set_value(jax.random.normal(jax.random.key(2), (2, 4)))  # trained: B != 0
    peft_io.export_peft(model, f"{BUCKET}/adapt/adapters", names=peft_io.IDENTITY_NAMES, base_model_name_or_path="b")
    assert sorted(os.listdir(local(f"{BUCKET}/adapt/adapters"))) == [peft_io.ADAPTER_CONFIG, peft_io.ADAPTER_WEIGHTS]
    fresh = _Tiny(0)
    assert peft_io.import_peft(fresh, f"{BUCKET}/adapt/adapters", names=peft_io.IDENTITY_NAMES) == ["proj"]
    x = jnp.ones((2, 4))
    np.testing.assert_array_equal(np.asarray(fresh.proj(x)), np.asarray(model.proj(x)))
    assert not np.allclose(np.asarray(fresh.proj(x)), np.asarray(_Tiny(0).proj(x)))  # the adapters came back
    assert not os.path.exists(tmp_path / "gs:")


def test_files_write_whole_objects_in_a_bucket_and_atomically_on_disk(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with fake_gcs(str(tmp_path / "gcs")) as local:
    with mock.patch.object(os, "replace", side_effect=AssertionError("a rename in a bucket")):
      files.atomic_write_json(f"{BUCKET}/a/b.json", {"x": 1})  # one upload, no temp object renamed into place
      with files.Appender(f"{BUCKET}/log.jsonl") as f:
        f.write("1\n")
        f.flush()
        assert open(local(f"{BUCKET}/log.jsonl")).read() == "1\n"
        f.write("2\n")
      files.append_text(f"{BUCKET}/log.jsonl", "3\n")
    assert json.load(open(local(f"{BUCKET}/a/b.json"))) == {"x": 1}
    assert files.read_text(f"{BUCKET}/log.jsonl") == "1\n2\n3\n"
    assert sorted(os.listdir(local(f"{BUCKET}/a"))) == ["b.json"]
    # Locally: temp file + rename, nothing left beside the file.
    files.atomic_write_text("d/c.txt", "hi")
    assert os.listdir(tmp_path / "d") == ["c.txt"] and (tmp_path / "d" / "c.txt").read_text() == "hi"
    assert not os.path.exists(tmp_path / "gs:")
  assert files.absolute(BUCKET) == BUCKET and files.absolute("x") == str(tmp_path / "x")
  assert files.normpath("gs://b/./x/../y") == "gs://b/y" and files.relpath("gs://b/x/y.png", "gs://b/") == "x/y.png"


def test_a_bucket_without_its_client_is_named_before_any_work(tmp_path, monkeypatch):
  try:
    import gcsfs  # noqa: F401
    pytest.skip("gcsfs is installed: the real bucket would be asked")
  except ImportError:
    pass
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ImportError, match=r"--workdir = gs://bucket/runs/x: .*pip install gcsfs"):
    main.run(_config(), BUCKET, STAGES)
  assert os.listdir(tmp_path) == []
