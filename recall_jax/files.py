"""Atomic file writes: a temp file in the same directory, fsync, rename. Readers never see half a file, and a
crash mid-write leaves the previous version (or nothing) in place. Of several processes only the writer
(`parallel.is_writer`, process 0) writes; the others hold the same content and skip the write."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from recall_jax import parallel


def atomic_write_text(path: str, text: str) -> str:
  if not parallel.is_writer():
    return path
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


def atomic_write_json(path: str, obj: Any, **dumps_kwargs: Any) -> str:
  """Serialises first (a bad value leaves no file behind), then writes atomically."""
  return atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")
