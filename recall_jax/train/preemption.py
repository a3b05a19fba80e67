"""SIGTERM as a request to stop at the next step boundary (a preempted VM gets SIGTERM, then some seconds).

Multi-process runs use JAX's preemption service (`jax.distributed` turns SIGTERM into a step every process agrees
on, read through Orbax's `CheckpointManager.reached_preemption`): a checkpoint save is collective, so all processes
must save at the same step. A single process has no such service (`reached_preemption_sync_point` is always False
without `jax.distributed`), so there a SIGTERM handler sets a flag that the training loop reads between steps: a
Python attribute, no host sync.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

import jax

log = logging.getLogger("recall_jax")

EXIT_CODE = 128 + signal.SIGTERM  # the status of a process ended by SIGTERM, as shells report it


class Preempted(SystemExit):
  """Raised once the loop has saved its checkpoint after a SIGTERM: the process exits with EXIT_CODE and no
  traceback, `finally` blocks run, and `except Exception` handlers do not mistake it for a failure."""

  def __init__(self, step: int, directory: str):
    super().__init__(EXIT_CODE)
    self.step, self.directory = step, directory

  def __str__(self) -> str:
    return f"preempted (SIGTERM) at step {self.step}; checkpoint saved under {self.directory}"


class Preemption:
  """Context manager: while open, SIGTERM (single process, main thread) only sets `requested`; `reached(step)` is
  that flag or JAX's preemption sync point at `step`. The previous handler comes back on exit."""

  def __init__(self, sync_point: Callable[[int], bool]):
    self._sync_point = sync_point
    self._previous = None
    self.requested = False

  def _on_sigterm(self, signum, frame) -> None:
    self.requested = True  # only a flag: the loop logs and saves at its next step boundary

  def __enter__(self) -> "Preemption":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def reached(self, step: int) -> bool:
    # Called at every step by every process: JAX's sync point requires it.
    return self._sync_point(step) or self.requested
