"""Shared validation for the dataset readers: JSON loading, typed field access, image checks, strict/skip policy.

A whole file that is missing or not valid JSON always raises DataError. A bad record (missing or mistyped field,
missing or unreadable image) raises DataError naming the file and the record index in strict mode
(`on_error="raise"`); with `on_error="skip"` it is dropped and listed as (source, reason), source = "<file>#<index>",
and the reader logs a warning with the count.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any, Optional

from PIL import Image

from recall_jax import files
from recall_jax.data.records import DataError

ON_ERROR = ("raise", "skip")
# Decode every image up front when a split touches at most this many (cheap for the synthetic world and small sets).
DECODE_CHECK_MAX_IMAGES = 20000

log = logging.getLogger(__name__)


class BadRecord(Exception):
  """Raised inside a reader's record loop; `Policy.bad` turns it into a DataError or a skipped entry."""


def load_json(path: pathlib.Path) -> Any:
  try:
    text = path.read_text()
  except FileNotFoundError:
    raise DataError(f"{path}: file not found") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read: {e}") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: malformed JSON: {e}") from None


def expect(value: Any, kind: type | tuple[type, ...], path: pathlib.Path, what: str) -> Any:
  """A whole-file type check (e.g. the top level must be a list)."""
  if not isinstance(value, kind):
    raise DataError(f"{path}: {what} must be {_kind_name(kind)}, got {type(value).__name__}")
  return value


def field(record: Any, key: str, kind: type | tuple[type, ...]) -> Any:
  """record[key], which must exist and have type `kind` (bool is never accepted as an int)."""
  if not isinstance(record, dict):
    raise BadRecord(f"record must be a JSON object, got {type(record).__name__}")
  if key not in record:
    raise BadRecord(f"missing field {key!r}")
  value = record[key]
  if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
    raise BadRecord(f"field {key!r} must be {_kind_name(kind)}, got {type(value).__name__}")
  return value


def string_list(record: Any, key: str, length: Optional[int] = None) -> tuple[str, ...]:
  values = field(record, key, list)
  if not all(isinstance(v, str) for v in values):
    raise BadRecord(f"field {key!r} must be a list of strings")
  if length is not None and len(values) != length:
    raise BadRecord(f"field {key!r} must have {length} entries, got {len(values)}")
  return tuple(values)


def _as_tuple(kind) -> tuple[type, ...]:
  return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind) -> str:
  return " or ".join(k.__name__ for k in _as_tuple(kind))


def image_problem(path: pathlib.Path, decode: bool) -> Optional[str]:
  """Why an image cannot be used (missing / undecodable), or None."""
  if not files.is_file(path):
    return f"image file not found: {path}"
  if decode:
    try:
      with files.path(path).open("rb") as f, Image.open(f) as img:
        img.load()
    except Exception as e:  # PIL raises many types for corrupt files; all mean the same here.
      return f"unreadable image {path}: {type(e).__name__}: {e}"
  return None


class ImageChecker:
  """Checks each image path once; `decode=None` decodes when the split has at most DECODE_CHECK_MAX_IMAGES."""

  def __init__(self, decode: Optional[bool], num_images: int):
    self.decode = num_images <= DECODE_CHECK_MAX_IMAGES if decode is None else decode
    self._seen: dict[pathlib.Path, Optional[str]] = {}

  def problem(self, path: pathlib.Path) -> Optional[str]:
    if path not in self._seen:
      self._seen[path] = image_problem(path, self.decode)
    return self._seen[path]

  def require(self, path: pathlib.Path, role: str) -> None:
    problem = self.problem(path)
    if problem:
      raise BadRecord(f"{role}: {problem}")


class Policy:
  """Strict (raise) or lenient (skip and report) handling of bad records."""

  def __init__(self, on_error: str):
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    self.on_error = on_error
    self.skipped: list[tuple[str, str]] = []

  def bad(self, path: pathlib.Path, index: int, reason: str, record_id: Any = None) -> None:
    name = f"record {index}" + (f" ({record_id})" if record_id is not None else "")
    if self.on_error == "raise":
      raise DataError(f"{path}: {name}: {reason}")
    self.skipped.append((f"{path}#{index}", reason))

  def bad_file(self, path: pathlib.Path, reason: str) -> None:
    """A bad file that is a record by itself (a gallery image listed from a directory)."""
    if self.on_error == "raise":
      raise DataError(f"{path}: {reason}")
    self.skipped.append((str(path), reason))

  def report(self, what: str) -> tuple[tuple[str, str], ...]:
    if self.skipped:
      log.warning("%s: skipped %d bad record(s), first: %s: %s", what, len(self.skipped), *self.skipped[0])
    return tuple(self.skipped)


def record_id(record: Any, key: str) -> Any:
  """The record's id for messages, when it has one."""
  return f"{key}={record[key]!r}" if isinstance(record, dict) and key in record else None
