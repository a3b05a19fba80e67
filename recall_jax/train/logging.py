"""Metric writing without TensorFlow: console lines (with recall_jax.progress's steps/s and ETA), TensorBoard events via
tensorboardX, and a JSONL file, all from one `write` call at logging intervals (the only host syncs of the loop)."""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping

import jax
import numpy as np
from PIL import Image

log = logging.getLogger("recall_jax")


class MetricWriter:
  """Writes scalars to the console, to TensorBoard event files (tensorboardX) and to <workdir>/metrics.jsonl."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, is_primary: bool = True):
    self.is_primary = is_primary
    self._tb = None
    self._jsonl = None
    if is_primary:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      if tensorboard:
        from tensorboardX import SummaryWriter  # imported lazily: only the writing process needs it
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float], *, prefix: str = "", progress: str = "") -> None:
    if not self.is_primary:
      return
    values = {f"{prefix}{k}": float(np.asarray(v)) for k, v in scalars.items()}
    for k, v in values.items():
      if self._tb is not None:
        self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
    log.info("[step %d] %s%s", step, shown, f" | {progress}" if progress else "")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


def log_pictures(stage_dir: str, *, step: int = 0) -> list[str]:
  """Every PNG a stage wrote (retrievals, mined failures, generated texts, the report) into the stage's TensorBoard
  events (<stage_dir>/tensorboard), tagged by its path in the stage folder. Returns those paths."""
  names = []
  for root, dirs, files in os.walk(stage_dir):
    dirs[:] = sorted(d for d in dirs if d not in _NOT_PICTURES)
    names += sorted(os.path.relpath(os.path.join(root, f), stage_dir) for f in files if f.endswith(".png"))
  if names and jax.process_index() == 0:
    from tensorboardX import SummaryWriter
    tb = SummaryWriter(os.path.join(stage_dir, "tensorboard"))
    try:
      _add_images(tb, step, {f"pictures/{n[:-4]}": os.path.join(stage_dir, n) for n in names})
    finally:
      tb.close()
  return names


_NOT_PICTURES = {"tensorboard", "checkpoints", "superseded"}


def _add_images(tb, step: int, images: Mapping[str, str]) -> None:
  for tag, path in images.items():
    with Image.open(path) as img:
      tb.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")
  tb.flush()
