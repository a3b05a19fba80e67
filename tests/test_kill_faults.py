"""Kill for real: the main job's stages run in a subprocess that SIGKILLs itself (recall_jax/faults.py) during a
training step, during an Orbax checkpoint write and during calibrate's partial writes; a plain rerun must then end
with exactly the artifacts of an uninterrupted run. This is the promise a preempted VM relies on. A SIGTERM (the
preemption notice) mid-training leaves a checkpoint at the step reached, and the rerun again equals the straight run."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from recall_jax import faults
from recall_jax.train import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = [
    "--config.world.image_size=56", "--config.data.image_buckets=56", "--config.data.dataset=cirr",
    "--config.train.steps=6", "--config.train.global_batch_size=4", "--config.train.checkpoint_every=2",
    "--config.train.eval_every=100", "--config.train.log_every=1", "--config.train.data_threads=1",
    "--config.train.best_metric=", "--config.lora.rank=4", "--config.eval.batch_size=8",
    "--config.eval.sheet_queries=1", "--config.mine.batch_size=8", "--config.mine.sheet_queries=1",
    "--config.calibrate.rewriter=oracle", "--config.calibrate.max_records=8", "--config.calibrate.batch_size=2",
    "--config.calibrate.sheet_samples=1",
]


def _run(workdir, stages, kill_at=None, signal_name=None):
  env = {k: v for k, v in os.environ.items() if k not in (faults.ENV, faults.SIGNAL_ENV)}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"  # one device: the same program in every process
  if kill_at:
    env[faults.ENV] = kill_at
  if signal_name:
    env[faults.SIGNAL_ENV] = signal_name
  cmd = [sys.executable, "-m", "recall_jax.main", "--config", "configs/tiny.py", "--workdir", str(workdir),
         "--stages", stages, *OVERRIDES]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _artifacts(workdir, stages):
  """What the stages made, without what differs between runs by nature (times, run ids, absolute paths)."""
  out = {}
  if "adapt" in stages:
    out["adapters"] = load_file(os.path.join(workdir, "adapt", "adapters", "adapter_model.safetensors"))
    out["adapt_metrics"] = json.load(open(os.path.join(workdir, "adapt", "manifest.json")))["last_train_metrics"]
  if "calibrate" in stages:
    for name in ("generations.jsonl", "corrective.jsonl"):
      out[name] = open(os.path.join(workdir, "calibrate", name)).read()
  return out


def _assert_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if k == "adapters":
      assert a[k].keys() == b[k].keys() and len(a[k]) > 0
      for name in a[k]:
        np.testing.assert_array_equal(a[k][name], b[k][name], err_msg=name)
    else:
      assert a[k] == b[k], k


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  _ok(_run(workdir, "prepare,adapt,mine,calibrate"))
  return workdir


def _linked(straight, tmp_path, stages):
  workdir = tmp_path / "killed"
  workdir.mkdir()
  for stage in stages:  # finished upstream stages shared with the straight run (same config, same run ids)
    os.symlink(straight / stage, workdir / stage)
  return workdir


@pytest.mark.parametrize("kill_at, shared, stages", [
    ("train.step:4", ("prepare",), "adapt"),
    ("checkpoint.write:2", ("prepare",), "adapt"),
    ("calibrate.write:3", ("prepare", "adapt", "mine"), "calibrate"),
])
def test_a_sigkill_mid_stage_then_a_rerun_equals_the_uninterrupted_run(straight, tmp_path, kill_at, shared, stages):
  workdir = _linked(straight, tmp_path, shared)
  killed = _run(workdir, stages, kill_at=kill_at)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not os.path.exists(workdir / stages / "manifest.json")  # the stage did not finish
  resumed = _ok(_run(workdir, stages))
  if stages == "adapt":
    assert "resumed from step" in resumed.stderr
  _assert_equal(_artifacts(workdir, stages), _artifacts(straight, stages))


def test_a_sigterm_mid_training_saves_the_step_reached_and_a_rerun_equals_the_uninterrupted_run(straight, tmp_path):
  workdir = _linked(straight, tmp_path, ("prepare",))
  # SIGTERM during step 3 (checkpoint_every = 2): only the preemption save can leave a checkpoint at step 3.
  stopped = _run(workdir, "adapt", kill_at="train.step:3", signal_name="SIGTERM")
  assert stopped.returncode == preemption.EXIT_CODE, stopped.stderr[-3000:]
  assert "SIGTERM: stopped after step 3 and saved its checkpoint" in stopped.stderr
  assert "Traceback" not in stopped.stderr
  steps = sorted(int(p.name) for p in (workdir / "adapt" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 3], steps
  assert not os.path.exists(workdir / "adapt" / "manifest.json")
  resumed = _ok(_run(workdir, "adapt"))
  assert "resumed from step 3" in resumed.stderr
  _assert_equal(_artifacts(workdir, "adapt"), _artifacts(straight, "adapt"))
