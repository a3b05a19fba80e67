"""The `recall-jax` console script on the tiny world: `run` (prepare, in a subprocess, as a user launches it), then
`encode` (an image folder and a dataset split), `search` and `evaluate` in-process on adapters with their
recall_config.json; evaluate's metrics equal the evaluate stage's on the same adapters. pyproject declares the
requirements' pins and the script."""

import json
import os
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import tiny
from recall_jax import cli, recall_config
from recall_jax.models import lora, peft_io
from recall_jax.models.qwen2_5_vl import names as qwen_names
from recall_jax.stages import common, evaluate
from recall_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["--config.world.image_size=56", "--config.data.image_buckets=56", "--config.data.dataset=cirr",
             "--config.lora.rank=4", "--config.eval.batch_size=8"]


def _config():
  cfg = tiny.get_config()
  cfg.world.image_size = 56
  cfg.data.image_buckets = 56
  cfg.data.dataset = "cirr"
  cfg.lora.rank = 4
  cfg.eval.batch_size = 8
  cfg.eval.sheet_queries = 1
  return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """(workdir, adapter dir): `recall-jax run --stages prepare`, then adapters as a training stage leaves them
  (freshly initialised: what they hold does not matter here) with their recall_config.json."""
  workdir = str(tmp_path_factory.mktemp("cli"))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.run([sys.executable, "-m", "recall_jax.cli", "run", "--config", "configs/tiny.py", "--workdir",
                         workdir, "--stages", "prepare", *OVERRIDES], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.exists(os.path.join(workdir, "prepare", "manifest.json"))
  cfg = _config()
  model, _ = common.load_base_model(cfg, workdir)
  trainer.add_adapters(model, cfg, seed=0)
  adapters = os.path.join(workdir, "adapt", "adapters")
  base = common.foundation_checkpoint(cfg, workdir)
  peft_io.export_peft(model, adapters, names=qwen_names.PEFT_NAMES, base_model_name_or_path=base)
  recall_config.write(adapters, common.adapter_recall_config(cfg, "adapt", base))
  return workdir, adapters


def _cirr(workdir):
  return os.path.join(workdir, "prepare", "world", "cirr")


def test_encode_search_and_evaluate(world, tmp_path, capsys):
  workdir, adapters = world
  split = common.read_splits(_config(), workdir, "val")[0]
  folder = tmp_path / "gallery"
  folder.mkdir()
  for name in split.gallery[:5]:
    shutil.copy(split.images[name], folder / f"{name}.png")

  cli.main(["encode", adapters, "--images", str(folder), "--out", str(tmp_path / "folder.npz")])
  assert capsys.readouterr().out == f"encoded 5 images from {folder}: embeddings 5 x 64 -> {tmp_path}/folder.npz\n"
  with np.load(tmp_path / "folder.npz") as g:
    assert list(g["ids"]) == sorted(split.gallery[:5]) and g["embeddings"].shape == (5, 64)

  cli.main(["encode", adapters, "--data-root", _cirr(workdir), "--split", "val", "--out", str(tmp_path / "val.npz")])
  assert capsys.readouterr().out.startswith(f"encoded {len(split.gallery)} images from {_cirr(workdir)} val:")

  query = split.queries[0]
  cli.main(["search", adapters, "--gallery", str(tmp_path / "val.npz"), "--reference", split.images[query.reference],
            "--text", query.captions[0], "--k", "3"])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == f"query 1: {split.images[query.reference]} + {query.captions[0]!r}" and len(lines) == 4
  assert [line.split()[0] for line in lines[1:]] == ["1.", "2.", "3."]
  assert all(line.split()[1] in split.gallery for line in lines[1:])

  results = tmp_path / "results.json"
  cli.main(["evaluate", adapters, "--data-root", _cirr(workdir), "--out", str(results)])
  out = capsys.readouterr().out
  assert out.startswith("cirr val: R@1=") and out.endswith(f"results -> {results}\n")
  # The evaluate stage's numbers for the same adapters on the same split.
  cfg = _config()
  model, tokenizer = common.load_base_model(cfg, workdir)
  peft_io.import_peft(model, adapters, names=qwen_names.PEFT_NAMES)
  lora.merge_lora(model)
  stage, _ = evaluate.evaluate_model(cfg, workdir, str(tmp_path / "stage"), model, tokenizer, adapters)
  assert json.load(open(results))["metrics"] == stage


def test_search_refuses_a_gallery_of_other_adapters(world, tmp_path):
  workdir, adapters = world
  cli.main(["encode", adapters, "--data-root", _cirr(workdir), "--out", str(tmp_path / "val.npz")])
  other = str(tmp_path / "other")
  shutil.copytree(adapters, other)
  weights = os.path.join(other, peft_io.ADAPTER_WEIGHTS)
  tensors = load_file(weights)
  save_file({k: v + 1.0 for k, v in tensors.items()}, weights)
  ref = common.read_splits(_config(), workdir, "val")[0]
  with pytest.raises(SystemExit, match="was encoded by another model or preprocessing"):
    cli.main(["search", other, "--gallery", str(tmp_path / "val.npz"),
              "--reference", ref.images[ref.gallery[0]], "--text", "is red"])


def test_pyproject_declares_the_pins_and_the_script():
  project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
  pins = [line.strip() for line in open(os.path.join(ROOT, "requirements.txt"))
          if line.strip() and not line.startswith("#")]
  assert project["dependencies"] == pins
  module, fn = project["scripts"]["recall-jax"].split(":")
  assert module == "recall_jax.cli" and getattr(cli, fn) is cli.main
