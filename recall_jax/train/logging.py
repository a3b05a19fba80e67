"""Metric writing without TensorFlow: console lines with steps/s and ETA, TensorBoard events via tensorboardX,
and a JSONL file, all from one `write` call at logging intervals (the only host syncs of the loop)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Mapping

import numpy as np

log = logging.getLogger("recall_jax")


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Rate and ETA over a run of `total` units (steps, samples), measured since the last `start()`."""

  def __init__(self, total: int, unit: str = "steps"):
    self.total, self.unit = total, unit
    self.start()

  def start(self, done: int = 0) -> None:
    self._t0, self._done0 = time.perf_counter(), done

  def line(self, done: int) -> str:
    elapsed = time.perf_counter() - self._t0
    rate = (done - self._done0) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    eta_s = format_duration(eta) if np.isfinite(eta) else "?"
    return f"{done}/{self.total} {self.unit} | {rate:.2f} {self.unit}/s | ETA {eta_s}"


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
