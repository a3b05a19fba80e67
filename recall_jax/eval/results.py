"""Results files: metrics together with the protocol, config and checkpoint that produced them, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping


def write_json_atomic(path: str, obj: Any) -> str:
  """Writes JSON to a temp file in the same directory, then renames it over `path`: readers never see half a file."""
  text = json.dumps(obj, indent=1, allow_nan=False)  # serialise first: a bad value leaves no file behind
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return path


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
  with open(path) as f:
    record = json.load(f)
  missing = {"metrics", "protocol", "config", "checkpoint"} - set(record)
  if missing:
    raise ValueError(f"{path}: not a results file, missing {sorted(missing)}")
  return record
