"""A finished teach stage reused across workdirs (config teach.cache_dir): F costs most of the demo's CPU time and
depends only on the world, the base model, the teach recipe and the code.

An entry is <cache_dir>/<key>/ holding the stage's products (the merged checkpoint, the vision phase, metrics.jsonl)
and result.json (what teach.run returned). The key hashes
  * the config fields the teach stage's fingerprint holds (fingerprint.config_fields), with model.checkpoint
    replaced by what it names: "" = the tiny base the prepare stage builds from the config fields already in the key
    (so the workdir's path does not matter), else the realpath of the checkpoint given;
  * every source and prompt file of the recall_jax package: changed code never reuses an F taught by other code.
Entries are written whole (a temporary folder renamed into place), so a crash leaves no half entry; a reused stage
records `reused_from` in its manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any, Optional

from ml_collections import ConfigDict

from recall_jax import files
from recall_jax.stages import artifacts, fingerprint

log = logging.getLogger("recall_jax")

PRODUCTS = ("checkpoint", "vision", "metrics.jsonl")  # what later stages and the report read of a teach folder
RESULT = "result.json"
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_digest(root: str = _PACKAGE) -> str:
  """sha256 of every .py / .txt / .jinja file under the package (paths and contents), in sorted order."""
  h = hashlib.sha256()
  for folder, dirs, names in sorted(os.walk(root)):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for name in sorted(names):
      if name.endswith((".py", ".txt", ".jinja")):
        path = os.path.join(folder, name)
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
          h.update(f.read() + b"\0")
  return h.hexdigest()[:16]


def key(cfg: ConfigDict, workdir: str) -> str:
  fields = fingerprint.config_fields(cfg, workdir, "teach")
  fields["model.checkpoint"] = files.real(cfg.model.checkpoint) if cfg.model.checkpoint else "<prepare>"
  return fingerprint.digest({"fields": fields, "code": code_digest()})


def entry_dir(cache_dir: str, cache_key: str) -> str:
  if files.is_remote(cache_dir):  # an entry is made whole by a folder rename, which a bucket does not have
    raise ValueError(f"config teach.cache_dir = {cache_dir!r}: the teach cache must be a local folder (the run's "
                     "workdir may be in a bucket)")
  return os.path.join(os.path.expanduser(cache_dir), cache_key)


def restore(cache_dir: str, cache_key: str, out: str) -> Optional[dict[str, Any]]:
  """Copies a finished entry's products into `out` and returns its result (checkpoint path made `out`'s), or None
  when the cache holds no entry for the key."""
  entry = entry_dir(cache_dir, cache_key)
  result_path = os.path.join(entry, RESULT)
  if not os.path.exists(result_path):
    return None
  with open(result_path) as f:
    try:
      result = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"teach cache entry {result_path} is corrupt ({e}); delete {entry} to teach again") from None
  for name in PRODUCTS:
    src, dst = os.path.join(entry, name), os.path.join(out, name)
    if os.path.exists(src):
      files.copy_tree(src, dst)  # into a local or a bucket workdir
  result["checkpoint"] = os.path.join(out, "checkpoint")
  result["reused_from"] = entry
  log.info("[teach] reusing the finished teach of %s (config teach.cache_dir; same recipe, world and code)", entry)
  return result


def store(cache_dir: str, cache_key: str, out: str, result: dict[str, Any]) -> str:
  """Writes `out`'s products and `result` as the entry of the key (whole or not at all); returns the entry."""
  entry = entry_dir(cache_dir, cache_key)
  if os.path.exists(os.path.join(entry, RESULT)):
    return entry
  tmp = f"{entry}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for name in PRODUCTS:
    src = os.path.join(out, name)
    if files.exists(src):
      files.copy_tree(src, os.path.join(tmp, name))  # from a local or a bucket workdir
  artifacts.atomic_write_json(os.path.join(tmp, RESULT), result)
  shutil.rmtree(entry, ignore_errors=True)  # a stale half entry of a crashed store
  os.replace(tmp, entry)
  log.info("[teach] stored F in the teach cache: %s", entry)
  return entry
