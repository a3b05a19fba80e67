"""Every file the project reads or writes under a workdir, dataset root or checkpoint goes through here, on a local
disk or in a bucket (gs://, s3://, ... through etils.epath; real buckets need gcsfs / s3fs installed).

Atomic writes: on a local disk, a temp file in the same directory, fsync, rename: readers never see half a file,
and a crash mid-write leaves the previous version (or nothing) in place. A bucket has no atomic rename, but a
single-object upload is atomic (the object appears whole or not at all), so there the object is written in one go.
Libraries that only take local paths (tokenizer files, safetensors, tensorboardX) work on a local copy:
`local_view` downloads a remote file or folder, `local_output` uploads what was written into a local folder.

Of several processes only the writer (`parallel.is_writer`, process 0) writes, uploads, moves or deletes; the
others hold the same content and skip it (`parallel.barrier` orders the reads after the writes).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from typing import Any, Iterator

from etils import epath

from recall_jax import parallel

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL path (gs://bucket/..., s3://...), False for a local one."""
  return bool(_SCHEME.match(os.fspath(path)))


def path(p: str | os.PathLike) -> epath.Path:
  return epath.Path(p)


def absolute(p: str | os.PathLike) -> str:
  """os.path.abspath for a local path; a URL is absolute already (abspath would make it ./gs:/bucket/...)."""
  return os.fspath(p) if is_remote(p) else os.path.abspath(p)


def normpath(p: str | os.PathLike) -> str:
  """os.path.normpath that keeps a URL's scheme (normpath would turn gs://b/x into gs:/b/x)."""
  p = os.fspath(p)
  m = _SCHEME.match(p)
  return m.group(0) + posixpath.normpath(p[m.end():]) if m else os.path.normpath(p)


def relpath(p: str | os.PathLike, start: str | os.PathLike) -> str:
  """os.path.relpath, also for URLs (`p` under `start`)."""
  if not is_remote(p):
    return os.path.relpath(p, start)
  return posixpath.relpath(normpath(p).split("://", 1)[1], normpath(start).split("://", 1)[1])


def real(p: str | os.PathLike) -> str:
  """os.path.realpath for a local path (links resolved); a URL as it is."""
  return os.fspath(p) if is_remote(p) else os.path.realpath(p)


def require_reachable(p: str | os.PathLike, what: str) -> None:
  """Touches `p`'s filesystem once, so that a bucket path whose client is not installed fails before any work,
  naming the flag or config key `what` that gave it."""
  try:
    exists(p)
  except ImportError as e:
    raise ImportError(f"{what} = {os.fspath(p)}: {e}. A gs:// path needs `pip install gcsfs` (which brings "
                      "google-cloud-storage, which Orbax uses too); s3:// needs s3fs") from e


def exists(p: str | os.PathLike) -> bool:
  return path(p).exists()


def is_dir(p: str | os.PathLike) -> bool:
  return path(p).is_dir()


def is_file(p: str | os.PathLike) -> bool:
  return path(p).exists() and not path(p).is_dir()


def makedirs(p: str | os.PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: str | os.PathLike) -> list[str]:
  return sorted(child.name for child in path(p).iterdir())


def read_text(p: str | os.PathLike) -> str:
  return path(p).read_text()


def read_bytes(p: str | os.PathLike) -> bytes:
  return path(p).read_bytes()


def write_bytes(p: str | os.PathLike, data: bytes) -> str:
  """A plain write (parent folders created), for bulk files that only count once a later manifest names them (a
  world's images): no fsync per file."""
  if not parallel.is_writer():
    return os.fspath(p)
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(data)
  return os.fspath(p)


def write_text(p: str | os.PathLike, text: str) -> str:
  return write_bytes(p, text.encode("utf-8"))


def atomic_write_bytes(p: str | os.PathLike, data: bytes) -> str:
  if not parallel.is_writer():
    return os.fspath(p)
  p = os.fspath(p)
  if is_remote(p):
    path(p).write_bytes(data)  # one object upload: atomic on GCS / S3
    return p
  directory = os.path.dirname(os.path.abspath(p))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(p)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  except BaseException:
    os.unlink(tmp)
    raise
  return p


def atomic_write_text(p: str | os.PathLike, text: str) -> str:
  return atomic_write_bytes(p, text.encode("utf-8"))


def atomic_write_json(p: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> str:
  """Serialises first (a bad value leaves no file behind), then writes atomically."""
  return atomic_write_text(p, json.dumps(obj, **dumps_kwargs) + "\n")


def append_text(p: str | os.PathLike, text: str) -> None:
  """Adds `text` at the end of the file (created if absent), durable when this returns. An object in a bucket
  cannot be appended to: it is rewritten whole, old content + `text`, in one upload (so a reader sees either)."""
  if not parallel.is_writer():
    return
  p = os.fspath(p)
  if is_remote(p):
    atomic_write_text(p, (read_text(p) if exists(p) else "") + text)
    return
  os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
  with open(p, "a") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


class Appender:
  """A text file kept open for appending (created if absent). Locally a plain file in append mode: `flush` hands
  the writes to the OS, `sync` also fsyncs. In a bucket an object cannot be appended to: the text is kept, and
  `flush` / `sync` / `close` upload the whole object (old content + everything written) in one go."""

  def __init__(self, p: str | os.PathLike):
    self.path, self.remote = os.fspath(p), is_remote(p)
    self.writes = parallel.is_writer()  # the other processes hold the same text and write nothing
    if not self.writes:
      return
    if self.remote:
      self._text, self._dirty = (read_text(self.path) if exists(self.path) else ""), False
    else:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      self._file = open(self.path, "a")

  def write(self, text: str) -> None:
    if not self.writes:
      return
    if self.remote:
      self._text, self._dirty = self._text + text, True
    else:
      self._file.write(text)

  def flush(self) -> None:
    if not self.writes:
      return
    if not self.remote:
      self._file.flush()
    elif self._dirty:
      atomic_write_text(self.path, self._text)
      self._dirty = False

  def sync(self) -> None:
    if not self.writes:
      return
    self.flush()
    if not self.remote:
      os.fsync(self._file.fileno())

  def close(self) -> None:
    if not self.writes:
      return
    if self.remote:
      self.flush()
    else:
      self._file.close()

  def __enter__(self) -> "Appender":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def remove(p: str | os.PathLike) -> None:
  if not parallel.is_writer():
    return
  path(p).unlink()


def rmtree(p: str | os.PathLike) -> None:
  if not parallel.is_writer():
    return
  path(p).rmtree(missing_ok=True)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves a file or folder (a link moves as the link). A bucket has no folders to rename: there every object is
  copied, then the source deleted (epath's rename would also refuse a destination whose parent holds no object)."""
  if not parallel.is_writer():
    return
  if not is_remote(src) and not is_remote(dst):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    os.replace(src, dst)
    return
  copy_tree(src, dst)
  rmtree(src)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Copies one file between any two filesystems, streamed (a checkpoint shard never sits whole in memory). Every
  process copies (local_view downloads on each); writes into the run's folders go through the gated helpers."""
  if not is_remote(src) and not is_remote(dst):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    shutil.copy2(src, dst)
    return
  path(dst).parent.mkdir(parents=True, exist_ok=True)
  with path(src).open("rb") as fin, path(dst).open("wb") as fout:
    shutil.copyfileobj(fin, fout, 1 << 24)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, *, skip_suffixes: tuple[str, ...] = ()) -> None:
  """Copies file or folder `src` to `dst` (folders merged, files overwritten), between any two filesystems; files
  whose names end in one of `skip_suffixes` are left out."""
  src, dst = os.fspath(src), os.fspath(dst)
  if not is_dir(src):
    copy_file(src, dst)
    return
  makedirs(dst)
  for root, _, names in path(src).walk():
    rel = "" if relpath(root, src) == "." else relpath(root, src)
    for name in names:
      if not (skip_suffixes and name.endswith(skip_suffixes)):
        copy_file(os.path.join(src, rel, name), os.path.join(dst, rel, name))


@contextlib.contextmanager
def local_view(p: str | os.PathLike, *, skip_suffixes: tuple[str, ...] = ()) -> Iterator[str]:
  """A local path holding `p` (a file or folder) for a library that reads only local files: `p` itself when local,
  else a temporary download (without files ending in `skip_suffixes`), removed on exit."""
  if not is_remote(p):
    yield os.fspath(p)
    return
  with tempfile.TemporaryDirectory(prefix="recall_jax_view.") as tmp:
    local = os.path.join(tmp, path(p).name)
    copy_tree(p, local, skip_suffixes=skip_suffixes)
    yield local


@contextlib.contextmanager
def local_output(p: str | os.PathLike) -> Iterator[str]:
  """A local folder to write `p`'s files into, for a library that writes only local files: `p` itself when local,
  else a temporary folder uploaded into `p` on a clean exit (each file one object upload)."""
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)
    yield os.fspath(p)
    return
  tmp = tempfile.mkdtemp(prefix="recall_jax_out.")
  try:
    yield tmp
    if parallel.is_writer():
      copy_tree(tmp, p)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
