"""Progress of long work: rate and ETA lines for training loops, embedding passes and decoding."""

from __future__ import annotations

import time

import numpy as np


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

  def rate(self, done: int) -> float:
    """Units per second since the last `start()`."""
    elapsed = time.perf_counter() - self._t0
    return (done - self._done0) / elapsed if elapsed > 0 else 0.0

  def line(self, done: int) -> str:
    rate = self.rate(done)
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    eta_s = format_duration(eta) if np.isfinite(eta) else "?"
    return f"{done}/{self.total} {self.unit} | {rate:.2f} {self.unit}/s | ETA {eta_s}"
