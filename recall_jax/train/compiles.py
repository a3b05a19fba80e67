"""Counting the programs JAX lowers, through the public `jax.monitoring` events (not a jitted function's private
cache size).

JAX records "/jax/core/compile/jaxpr_to_mlir_module_duration" each time it lowers a program for XLA: once per new
(function, shapes) signature, and also when the persistent compilation cache then finds the executable, since the
cache key is the lowered module. `CompileCounter.counting()` counts those events only while its block runs, so
wrapping one call counts the compilations that call caused (a step loop with static shapes: 1).
"""

from __future__ import annotations

import contextlib
import threading

from jax import monitoring

LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


class CompileCounter:
  """with CompileCounter() as counter: ... with counter.counting(): step(...) ... counter.count"""

  def __init__(self):
    self.count = 0
    self._active = threading.local()

  def _listen(self, event: str, duration_secs: float, **kwargs) -> None:
    del duration_secs, kwargs
    if event == LOWERING_EVENT and getattr(self._active, "on", False):  # only the counting thread's lowerings
      self.count += 1

  def start(self) -> "CompileCounter":
    monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def stop(self) -> None:
    monitoring.unregister_event_duration_listener(self._listen)

  def __enter__(self) -> "CompileCounter":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  @contextlib.contextmanager
  def counting(self):
    self._active.on = True
    try:
      yield self
    finally:
      self._active.on = False
