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
import io
import os
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from recall_jax import files

log = logging.getLogger("recall_jax")


def digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def file_digest(path: str) -> str:
  h = hashlib.sha256()
  with files.path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def file_stamp(path: str) -> list:
  """[absolute path, size, mtime_ns]: what changes when a file is rewritten, without reading it. An object in a
  bucket has its mtime in seconds; where its filesystem reports none (0), its contents' digest stands in."""
  if files.is_remote(path):
    st = files.path(path).stat()
    return [path, st.length, st.mtime or file_digest(path)]
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
  if not files.is_file(npy):
    return None
  emb = np.load(io.BytesIO(files.read_bytes(npy)))
  if emb.ndim != 2 or emb.shape[0] != rows:
    log.warning("[cache] %s holds %s embeddings, expected %d rows: embedding again", npy, emb.shape, rows)
    return None
  log.info("[cache] gallery embeddings from %s", npy)
  return emb


def store(cache_dir: str, parts: dict, emb: np.ndarray) -> str:
  """Writes `<key>.npy` and `<key>.json`, each atomically; returns the .npy path."""
  key = digest(parts)
  npy, meta = _paths(cache_dir, key)
  buf = io.BytesIO()
  np.save(buf, np.asarray(emb, np.float32))
  files.atomic_write_bytes(npy, buf.getvalue())
  files.atomic_write_json(meta, {"key": key, "rows": int(emb.shape[0]), "parts": parts}, indent=1, sort_keys=True)
  return npy
