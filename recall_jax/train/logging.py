"""Metric writing without TensorFlow: console lines (with recall_jax.progress's steps/s and ETA), TensorBoard events via
tensorboardX, and a JSONL file, all from one `write` call at logging intervals (the only host syncs of the loop).

tensorboardX reaches buckets only through clients of its own (google-cloud-storage, boto3), not through etils.epath,
so for a bucket logdir the events go to a local folder that is copied to the bucket at every write and at close."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Mapping

import jax
import numpy as np
from PIL import Image

from recall_jax import files

log = logging.getLogger("recall_jax")


class MetricWriter:
  """Writes scalars to the console, to TensorBoard event files (tensorboardX) and to <workdir>/metrics.jsonl."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, is_primary: bool = True):
    self.is_primary = is_primary
    self._tb = None
    self._jsonl = None
    if is_primary:
      files.makedirs(workdir)
      self._jsonl = files.Appender(os.path.join(workdir, "metrics.jsonl"))
      if tensorboard:
        self._tb = TensorBoard(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float], *, prefix: str = "", progress: str = "") -> None:
    if not self.is_primary:
      return
    values = {f"{prefix}{k}": float(np.asarray(v)) for k, v in scalars.items()}
    for k, v in values.items():
      if self._tb is not None:
        self._tb.add_scalar(k, v, step)
    if self._tb is not None and self._tb.remote:  # a local writer flushes on its own schedule
      self._tb.flush()
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
    log.info("[step %d] %s%s", step, shown, f" | {progress}" if progress else "")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


class TensorBoard:
  """tensorboardX's SummaryWriter on `logdir`, a local folder or a bucket path. For a bucket path the events are
  written to a local temporary folder and copied into `logdir` at each flush and at close (each event file one
  object upload, so TensorBoard reading the bucket sees whole files)."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # imported lazily: only the writing process needs it
    self.logdir, self.remote = logdir, files.is_remote(logdir)
    self._local = tempfile.mkdtemp(prefix="recall_jax_tb.") if self.remote else logdir
    self.writer = SummaryWriter(self._local)

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self.writer.add_scalar(tag, value, step)

  def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
    self.writer.add_image(tag, image, step, dataformats="HWC")

  def flush(self) -> None:
    self.writer.flush()
    if self.remote:
      files.copy_tree(self._local, self.logdir)

  def close(self) -> None:
    self.writer.close()
    if self.remote:
      files.copy_tree(self._local, self.logdir)
      shutil.rmtree(self._local, ignore_errors=True)


def log_pictures(stage_dir: str, *, step: int = 0) -> list[str]:
  """Every PNG a stage wrote (retrievals, mined failures, generated texts, the report) into the stage's TensorBoard
  events (<stage_dir>/tensorboard), tagged by its path in the stage folder. Returns those paths."""
  names = []
  for root, dirs, found in files.path(stage_dir).walk():
    dirs[:] = sorted(d for d in dirs if d not in _NOT_PICTURES)
    names += sorted(files.relpath(root / f, stage_dir) for f in found if f.endswith(".png"))
  if names and jax.process_index() == 0:
    tb = TensorBoard(os.path.join(stage_dir, "tensorboard"))
    try:
      _add_images(tb, step, {f"pictures/{n[:-4]}": os.path.join(stage_dir, n) for n in names})
    finally:
      tb.close()
  return names


_NOT_PICTURES = {"tensorboard", "checkpoints", "superseded"}


def _add_images(tb, step: int, images: Mapping[str, str]) -> None:
  for tag, path in images.items():
    with files.path(path).open("rb") as f, Image.open(f) as img:
      tb.add_image(tag, np.asarray(img.convert("RGB")), step)
  tb.flush()
