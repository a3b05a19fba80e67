"""Orbax training checkpoints: one CheckpointManager whose steps hold {train state, Grain iterator position, JSON
metadata} and, at evaluated steps, the eval metrics; its preservation policy keeps the newest `keep` steps (for
resuming) and the best evaluated one.

Base weights never go in here: they always come from the Hugging Face checkpoint. The train state is whatever pytree
the trainer keeps (adapter params, optimizer state, step, rng).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from recall_jax import faults, files

MODES = ("max", "min")


class Checkpoints:
  """Steps under `directory`; with `best_metric`, the best step by metrics[best_metric] is kept besides the newest
  `keep` (Orbax's `AnyPreservationPolicy([LatestN, BestN])`)."""

  def __init__(self, directory: str, *, keep: int = 2, best_metric: str | None = None, best_mode: str = "max"):
    directory = files.absolute(directory)  # Orbax wants absolute paths; a bucket path (gs://...) is one already
    for former in ("latest", "best"):  # the former layout: one manager for resuming, a second for the best
      if files.is_dir(os.path.join(directory, former)):
        raise ValueError(f"{directory}: holds {former}/, a checkpoint of the former two-folder layout this version "
                         f"cannot resume; delete {directory} (or use another out_dir) to train again")
    if best_mode not in MODES:
      raise ValueError(f"best_mode must be one of {MODES}, got {best_mode!r}")
    self.directory, self.best_metric, self._reverse = directory, best_metric or None, best_mode == "min"
    keep_policies = [policies.LatestN(n=keep)]
    if self.best_metric:
      keep_policies.append(policies.BestN(get_metric_fn=self._metric, reverse=self._reverse, n=1,
                                          keep_checkpoints_without_metrics=False))
    # The preservation policy alone decides what is kept; best_fn / best_mode only say what "best" means, for
    # best_step() and so that Orbax writes each step's metrics to disk (without best_fn it keeps them in memory
    # only, and a resumed run's BestN would no longer see the best step's).
    self._manager = ocp.CheckpointManager(files.path(directory), options=ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep_policies),
        best_fn=self._metric if self.best_metric else None, best_mode=best_mode, create=True,
        enable_async_checkpointing=False))

  def _metric(self, metrics: dict) -> float:
    return metrics[self.best_metric]

  def save(self, step: int, state: Any, *, data_iterator: Any = None, meta: dict | None = None,
           metrics: dict[str, float] | None = None) -> None:
    """Writes step `step` and waits for it; `metrics` (the step's eval) make it a candidate for the best."""
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items()}
      if self.best_metric and self.best_metric not in metrics:
        raise ValueError(f"best metric {self.best_metric!r} (config train.best_metric) is not among the eval "
                         f"metrics {sorted(metrics)}")
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta or {}, step=step))}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    faults.kill_when_appears("checkpoint.write", self.directory)
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def metrics(self, step: int) -> dict[str, float] | None:
    """The eval metrics saved with `step` (None for a step saved without an eval)."""
    return self._manager.metadata(step).metrics or None

  def best_step(self) -> int | None:
    """The kept step with the best metric (None without best_metric or before any evaluated save)."""
    return self._manager.best_step() if self.best_metric else None

  def reached_preemption(self, step: int) -> bool:
    """JAX's preemption sync point (multi-process runs with the preemption service; False otherwise)."""
    return self._manager.reached_preemption(step)

  def restore(self, abstract_state: Any, *, step: int | None = None, data_iterator: Any = None
              ) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` (default: the latest); the data iterator, if given, is restored in place.
    `abstract_state` gives shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves are fine)."""
    step = step if step is not None else self._manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def close(self) -> None:
    self._manager.close()
