"""Orbax training checkpoints: {train state, Grain iterator position, JSON metadata}, keep-N, best-by-metric.

Base weights never go in here: they always come from the Hugging Face checkpoint. The train state is whatever pytree
the trainer keeps (adapter params, optimizer state, step, rng).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp

from recall_jax import faults


class Checkpoints:
  """`latest/` keeps the newest `keep` steps (for resuming); `best/` keeps the single best by `best_metric`."""

  def __init__(self, directory: str, *, keep: int = 2, best_metric: str | None = None, best_mode: str = "max"):
    directory = os.path.abspath(directory)
    self._latest = ocp.CheckpointManager(
        os.path.join(directory, "latest"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False))
    self._best = None
    self.best_metric = best_metric
    if best_metric:
      self._best = ocp.CheckpointManager(
          os.path.join(directory, "best"),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, best_fn=lambda m: m[best_metric], best_mode=best_mode, create=True,
              enable_async_checkpointing=False))

  @staticmethod
  def _args(state: Any, data_iterator: Any, meta: dict) -> ocp.args.Composite:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return ocp.args.Composite(**items)

  def save(self, step: int, state: Any, *, data_iterator: Any = None, meta: dict | None = None) -> None:
    faults.kill_when_appears("checkpoint.write", str(self._latest.directory))
    self._latest.save(step, args=self._args(state, data_iterator, dict(meta or {}, step=step)), force=True)
    self._latest.wait_until_finished()

  def save_best(self, step: int, state: Any, metrics: dict[str, float], meta: dict | None = None) -> bool:
    """Saves `state` under best/ when metrics[best_metric] beats the kept one; returns whether it did."""
    if self._best is None:
      raise ValueError("Checkpoints(best_metric=None): no best checkpoint is tracked")
    before = self._best.best_step()
    self._best.save(step, args=self._args(state, None, dict(meta or {}, step=step, metrics=metrics)),
                    metrics={k: float(v) for k, v in metrics.items()}, force=True)
    self._best.wait_until_finished()
    return self._best.best_step() != before

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    return None if self._best is None else self._best.best_step()

  def restore(self, abstract_state: Any, *, step: int | None = None, data_iterator: Any = None,
              best: bool = False) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` (default: latest, or the best one with best=True); the data iterator is
    restored in place. `abstract_state` gives shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves are fine)."""
    manager = self._best if best else self._latest
    if manager is None:
      raise ValueError("no best checkpoint is tracked")
    step = step if step is not None else (manager.best_step() if best else manager.latest_step())
    if step is None:
      raise FileNotFoundError(f"{manager.directory}: no checkpoint to restore")
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def close(self) -> None:
    self._latest.close()
    if self._best is not None:
      self._best.close()
