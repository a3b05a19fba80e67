"""The AOT plan compiles the training step of a 2-layer tiny model for a 4-chip TPU v5p slice (libtpu, no TPU) and
fails with what to change when it does not fit. The 7B plans are documented commands (benchmarks/aot_plan.md)."""

import json
import os
import subprocess
import sys

import pytest
from ml_collections import ConfigDict

from recall_jax import abstract_programs, aot, flops
from recall_jax import main as _main  # noqa: F401  (both define --config: importing them together must not collide)
from recall_jax.models.qwen2_5_vl import names
from recall_jax.models.qwen2_5_vl.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config.data.image_buckets=140", "--config.data.query_lengths=(64,)", "--config.data.target_lengths=(48,)",
         "--config.train.global_batch_size=16", "--config.train.chunk_size=8"]


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
  """The tiny model's training step at its full depth (2 text layers, 2 vision blocks, one of them full attention)
  planned against 1 MiB per chip: it cannot fit."""
  pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu (requirements-test.txt)")
  tmp = tmp_path_factory.mktemp("aot")
  checkpoint = tmp / "tiny"
  checkpoint.mkdir()
  (checkpoint / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
  out = tmp / "plan.json"
  run = subprocess.run(
      [sys.executable, "-m", "recall_jax.aot", "--config", os.path.join(ROOT, "configs/tiny.py"),
       "--topology", "v5p:2x2x1", "--programs", "train", "--layers", "full", "--hbm_gib", str(1 / 1024),
       f"--config.model.checkpoint={checkpoint}", "--json", str(out), *FLAGS],
      capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  return run, json.loads(out.read_text()) if out.exists() else None


def test_the_training_step_compiles_for_the_slice_and_reports_per_chip_bytes(plan):
  run, result = plan
  assert result is not None, run.stderr[-3000:]
  assert result["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  (row,) = result["programs"]["train"]
  assert row["source"] == "measured" and row["error"] is None
  assert row["total"] == row["arguments"] + row["temporaries"] + row["outputs"] - row["aliased"]
  assert row["temporaries"] > 0 and row["aliased"] > 0  # the donated state comes back in place


def test_the_reported_flops_are_the_analytic_count_of_the_configs_shapes(plan):
  _, result = plan
  model_cfg = tiny_config()
  adapters = flops.Adapters(regex=names.LORA_TARGET_REGEX, rank=16, dora=True, dropout=True)  # configs/base.py
  expected = flops.train_step(model_cfg, batch=16, num_chunks=2, query_length=64, target_length=48,
                              grid=(1, 10, 10), adapters=adapters)
  assert result["flops"]["train"] == expected["total"]


def test_a_step_that_does_not_fit_fails_naming_what_to_change(plan):
  run, result = plan
  assert run.returncode == 1, run.stderr[-3000:]
  (message,) = result["failures"]
  for lever in ("train.chunk_size", "sharding.rules", "model.remat"):
    assert lever in message
  assert message in run.stderr


def test_reduced_depths_keep_the_full_attention_blocks_among_them():
  model_cfg = tiny_config(text=dict(num_hidden_layers=28), vision=dict(depth=32, fullatt_block_indexes=(1, 2, 15)))
  two = aot.reduced(model_cfg, 2)
  assert (two.text.num_hidden_layers, two.vision.depth, two.vision.fullatt_block_indexes) == (2, 2, (1,))
  assert aot.full_pairs(model_cfg) == 32
  assert aot.extrapolate({"arguments": 1, "temporaries": 10, "outputs": 2, "aliased": 1, "total": 12},
                         {"arguments": 2, "temporaries": 14, "outputs": 2, "aliased": 1, "total": 17}, 1, 2, 32) == {
                             "arguments": 32, "temporaries": 134, "outputs": 2, "aliased": 1, "total": 167}


def test_the_image_grid_is_the_largest_bucket():
  cfg = ConfigDict({"data": {"image_buckets": ((140, 140), (112, 224))}})
  assert abstract_programs.image_grid(cfg, tiny_config()) == (1, 8, 16)
