"""Results files: metrics together with the protocol, config and checkpoint that produced them, written atomically."""

from __future__ import annotations

import json
from typing import Any, Mapping

from recall_jax import files


def write_json_atomic(path: str, obj: Any) -> str:
  """Strict JSON (no NaN), written atomically."""
  return files.atomic_write_json(path, obj, indent=1, allow_nan=False)


def _check_jsonable(name: str, value: Any) -> None:
  try:
    json.dumps(value, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"results {name} is not JSON-serialisable (convert ConfigDicts with .to_dict()): {e}") from e


def write_results(path: str, *, metrics: Mapping[str, Any], protocol: Mapping[str, Any], config: Mapping[str, Any],
                  checkpoint: str) -> str:
  """Writes {"metrics", "protocol", "config", "checkpoint"}; every argument is required so none can be forgotten."""
  record = {"metrics": dict(metrics), "protocol": dict(protocol), "config": dict(config), "checkpoint": str(checkpoint)}
  for name, value in record.items():
    _check_jsonable(name, value)
  return write_json_atomic(path, record)


def read_results(path: str) -> dict[str, Any]:
  """Reads a results file, checking it has the fields write_results writes."""
  record = json.loads(files.read_text(path))
  missing = {"metrics", "protocol", "config", "checkpoint"} - set(record)
  if missing:
    raise ValueError(f"{path}: not a results file, missing {sorted(missing)}")
  return record
