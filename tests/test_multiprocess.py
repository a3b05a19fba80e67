"""The main job as 2 processes x 4 CPU devices (`recall_jax.launch_local`, gloo collectives) equals 1 process x 8
devices: the same mined failures, Stage-3 samples, evaluation metrics and ranks, foundation P(yes), and the same
gradient in the first training step.

About 15 minutes on 2 cores (the two launches run side by side), so it is marked `multiprocess` and deselected by
default; run it with
  python -m pytest -m multiprocess tests/test_multiprocess.py -n 0
"""

import concurrent.futures
import json
import os

import numpy as np
import pytest

from recall_jax import launch_local

pytestmark = pytest.mark.multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny world at 56 px; one training step without gradient clipping, so Adam's first moment after it is
# (1 - b1) * the step's gradient; few short Stage-3 generations.
ARGS = ["--config", os.path.join(ROOT, "configs", "tiny.py"), "--stages", "prepare,adapt,mine,calibrate,evaluate",
        "--config.world.image_size=56", "--config.data.image_buckets=56", "--config.train.steps=1",
        "--config.train.global_batch_size=8", "--config.train.log_every=1", "--config.train.checkpoint_every=1",
        "--config.optim.clip_norm=0", "--config.calibrate.max_records=8", "--config.calibrate.batch_size=8",
        "--config.calibrate.max_new_tokens=8", "--config.eval.batch_size=8", "--config.mine.batch_size=8",
        "--config.eval.sheet_queries=2", "--config.mine.sheet_queries=2", "--config.calibrate.sheet_samples=2"]
# Stage 3 once more with the oracle's rewrites, all kept: corrective triplets carrying F's P(yes) (the tiny
# untaught F writes no parseable rewrite of its own).
ORACLE = ["--stages", "calibrate", "--config.calibrate.rewriter=oracle", "--config.calibrate.vqa_filter=False"]
B1 = 0.9  # optim.b1 of the config


def _launch(args, num_processes, devices):
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  rc = launch_local.launch(args, num_processes=num_processes, devices=devices, timeout=2400, env=env)
  assert rc == 0, f"{num_processes} x {devices}: exit status {rc}"


def _job(workdir, num_processes, devices):
  _launch([*ARGS, f"--workdir={workdir}"], num_processes, devices)
  os.rename(os.path.join(workdir, "calibrate"), os.path.join(workdir, "calibrate_model"))
  _launch([*ARGS, *ORACLE, f"--workdir={workdir}"], num_processes, devices)


def _text(path):
  with open(path) as f:
    return f.read()


def _first_step_gradient(workdir):
  """The adapters' gradient of training step 1: Adam's first moment in the step-1 checkpoint / (1 - b1)."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "adapt", "checkpoints", "1", "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  state = checkpointer.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                                               tree))
  (mu,) = [s["mu"] for s in state["opt_state"] if isinstance(s, dict) and "mu" in s]
  leaves = jax.tree_util.tree_flatten_with_path(mu)[0]
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64) / (1 - B1) for p, x in leaves}


def test_two_processes_give_the_artifacts_of_one(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    for job in [pool.submit(_job, one, 1, 8), pool.submit(_job, two, 2, 4)]:
      job.result()

  for name in ("mine/mined.jsonl", "calibrate_model/generations.jsonl", "calibrate_model/corrective.jsonl",
               "calibrate/generations.jsonl", "calibrate/corrective.jsonl"):
    assert _text(os.path.join(two, name)) == _text(os.path.join(one, name)), name
  assert len(_text(os.path.join(one, "calibrate/corrective.jsonl")).splitlines()) == 8

  evaluated = sorted(os.listdir(os.path.join(one, "evaluate", "baseline")))
  assert sorted(os.listdir(os.path.join(two, "evaluate", "baseline"))) == evaluated
  for name in evaluated:
    if name.startswith(("results_", "ranks_")):
      a, b = (json.loads(_text(os.path.join(w, "evaluate", "baseline", name))) for w in (one, two))
      key = "metrics" if name.startswith("results_") else "ranks"
      assert b[key] == a[key], name
      assert b.get("embedding_fingerprint") == a.get("embedding_fingerprint"), name
  for name in os.listdir(os.path.join(one, "evaluate", "foundation")):
    a, b = (json.loads(_text(os.path.join(w, "evaluate", "foundation", name))) for w in (one, two))
    assert b["p_yes"] == a["p_yes"], name
  assert json.loads(_text(os.path.join(two, "evaluate", "manifest.json")))["metrics"] == json.loads(
      _text(os.path.join(one, "evaluate", "manifest.json")))["metrics"]

  g1, g2 = _first_step_gradient(one), _first_step_gradient(two)
  assert g1.keys() == g2.keys()
  flat1 = np.concatenate([g1[k].ravel() for k in sorted(g1)])
  flat2 = np.concatenate([g2[k].ravel() for k in sorted(g2)])
  scale = np.linalg.norm(flat1)
  assert scale > 0
  # The all-reduces of gloo and of one process may add in other orders: agreement to float32 rounding.
  assert np.linalg.norm(flat2 - flat1) <= 1e-5 * scale, (np.linalg.norm(flat2 - flat1), scale)
  print(f"first-step gradient: |g| = {scale:.6g}, |g2 - g1| / |g| = {np.linalg.norm(flat2 - flat1) / scale:.3g}, "
        f"max |g2 - g1| = {np.abs(flat2 - flat1).max():.3g}")
