"""Where the run's inputs live: the dataset root and the base checkpoint, from the config or, when the config says
"", the outputs of the prepare stage. Every stage and the study read these; none of them imports a stage for it."""

from __future__ import annotations

import os

from ml_collections import ConfigDict


def world_root(cfg: ConfigDict, workdir: str) -> str:
  """The dataset root: config data.root, or ("" ) the synthetic world of the prepare stage."""
  if cfg.data.root is None:
    raise ValueError("config data.root is required: the dataset root in its real layout (or \"\" for the "
                     "synthetic world of the prepare stage)")
  return cfg.data.root or os.path.join(workdir, "prepare", "world")


def checkpoint_dir(cfg: ConfigDict, workdir: str) -> str:
  """The base checkpoint: config model.checkpoint, or ("") the tiny random one of the prepare stage."""
  if cfg.model.checkpoint is None:
    raise ValueError("config model.checkpoint is required: a Hugging Face Qwen2.5-VL checkpoint directory (or \"\" "
                     "for the tiny random checkpoint of the prepare stage)")
  return cfg.model.checkpoint or os.path.join(workdir, "prepare", "checkpoint")


def array_record_dir(cfg: ConfigDict, workdir: str) -> str:
  """The ArrayRecord form of the dataset (config data.format "array_record"): config data.array_record_dir (a
  prepared folder, e.g. in a bucket), or ("") <workdir>/prepare/array_record, which the prepare stage writes from
  the dataset root (`world_root`)."""
  return cfg.data.get("array_record_dir") or os.path.join(workdir, "prepare", "array_record")
