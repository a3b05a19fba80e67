"""Fault injection for the kill tests: with RECALL_KILL_AT="<point>:<n>", the process SIGKILLs itself the n-th
time it reaches <point>. A real SIGKILL (no finally blocks, no flushes, no atexit), at a chosen place, so a test
can check that a rerun resumes a stage to exactly the artifacts of an uninterrupted run. Unset: every point is a
dictionary lookup and nothing else. RECALL_KILL_SIGNAL=SIGTERM sends that signal instead (a preemption notice: the
process goes on to its handler).

Points: "train.step" (a training step dispatched, not finished), "checkpoint.write" (while Orbax writes a step's
checkpoint: its temporary folder exists), "calibrate.write" (between the records of a batch in calibrate's
partial file, with the batch not yet flushed).
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

ENV = "RECALL_KILL_AT"
SIGNAL_ENV = "RECALL_KILL_SIGNAL"
_hits: collections.Counter = collections.Counter()


def _armed(name: str) -> bool:
  """Counts a visit of point `name`; True on the visit RECALL_KILL_AT names."""
  spec = os.environ.get(ENV)
  if not spec:
    return False
  target, _, n = spec.rpartition(":")
  if target != name:
    return False
  _hits[name] += 1
  return _hits[name] == int(n)


def kill() -> None:
  name = os.environ.get(SIGNAL_ENV, "SIGKILL")
  try:
    sig = signal.Signals[name]
  except KeyError:
    raise ValueError(f"{SIGNAL_ENV}={name!r}: not a signal name (e.g. SIGKILL, SIGTERM)") from None
  os.kill(os.getpid(), sig)


def point(name: str) -> None:
  """Signals the process (SIGKILL unless RECALL_KILL_SIGNAL) when this is the visit of `name` that RECALL_KILL_AT
  names."""
  if _armed(name):
    kill()


def kill_when_appears(name: str, directory: str, marker: str = "tmp", timeout_s: float = 30.0) -> None:
  """For point `name` around a write into `directory`: when armed, a thread SIGKILLs the process as soon as an entry
  whose name contains `marker` (Orbax's temporary step folder) appears there, i.e. during the write."""
  if not _armed(name):
    return

  def watch():
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
      try:
        if any(marker in entry for entry in os.listdir(directory)):
          kill()
          return  # a signal the process survives (RECALL_KILL_SIGNAL) is sent once
      except FileNotFoundError:
        pass
      time.sleep(0.0002)

  threading.Thread(target=watch, daemon=True).start()
