"""recall_jax.parallel across 2 real processes x 2 CPU devices (gloo), launched by recall_jax.launch_local: batches
built from each process's slice, results gathered, rows merged from their owners, one writer and a barrier."""

import os

from recall_jax import launch_local

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_placement_helpers_across_two_processes(tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  rc = launch_local.launch([str(tmp_path)], num_processes=2, devices=2, module="tests.parallel_worker",
                           timeout=300, env=env)
  assert rc == 0
  assert (tmp_path / "shared.txt").read_text() == "written by 0\n"
  assert sorted(os.listdir(tmp_path)) == ["shared.txt"]  # no temp file of another process left behind
