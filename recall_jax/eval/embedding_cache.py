"""Gallery embeddings cached on disk under a fingerprint of everything they depend on.

`<cache_dir>/<key>.npy` holds the embeddings and `<key>.json` what went into the key: the model (base checkpoint
files, adapter contents, dtype, position mode), the preprocessing (encode config, prompts) and the gallery itself
(each image file's path, size and mtime, or an in-memory image's pixels). Any change gives another key, so a cache
never hands back embeddings of another model or gallery (ReCALL's PyTorch cache keyed by file list alone did).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from recall_jax import files

log = logging.getLogger("recall_jax")


def digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def file_stamp(path: str) -> list:
  """[absolute path, size, mtime_ns]: what changes when a file is rewritten, without reading it."""
  st = os.stat(path)
  return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def image_identity(image: Any) -> Any:
  if isinstance(image, Image.Image):
    return ["pixels", image.mode, list(image.size), hashlib.sha256(image.tobytes()).hexdigest()]
  return file_stamp(os.fspath(image))


def gallery_identity(images: Sequence[Any]) -> str:
  return digest([image_identity(im) for im in images])


def _paths(cache_dir: str, key: str) -> tuple[str, str]:
  return os.path.join(cache_dir, f"{key}.npy"), os.path.join(cache_dir, f"{key}.json")


def load(cache_dir: str, parts: dict, rows: int) -> Optional[np.ndarray]:
  """The cached embeddings for `parts`, or None; a cached array of the wrong row count is a miss."""
  npy, _ = _paths(cache_dir, digest(parts))
  if not os.path.isfile(npy):
    return None
  emb = np.load(npy)
  if emb.ndim != 2 or emb.shape[0] != rows:
    log.warning("[cache] %s holds %s embeddings, expected %d rows: embedding again", npy, emb.shape, rows)
    return None
  log.info("[cache] gallery embeddings from %s", npy)
  return emb


def store(cache_dir: str, parts: dict, emb: np.ndarray) -> str:
  """Writes `<key>.npy` (atomically: temp file + rename) and `<key>.json`; returns the .npy path."""
  key = digest(parts)
  npy, meta = _paths(cache_dir, key)
  os.makedirs(cache_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npy", dir=cache_dir)
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, np.asarray(emb, np.float32))
    os.replace(tmp, npy)
  except BaseException:
    os.unlink(tmp)
    raise
  files.atomic_write_json(meta, {"key": key, "rows": int(emb.shape[0]), "parts": parts}, indent=1, sort_keys=True)
  return npy
