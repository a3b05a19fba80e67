"""Atomic artifact writing and stage manifests, so a crashed run resumes at the first unfinished stage."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterable

from recall_jax import files
from recall_jax.files import atomic_write_text

MANIFEST = "manifest.json"


def atomic_write_json(path: str, obj: Any) -> str:
  return files.atomic_write_json(path, obj, indent=2, sort_keys=True, default=str)


def write_jsonl(path: str, records: Iterable[dict]) -> str:
  return atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))


def read_jsonl(path: str) -> list[dict]:
  out = []
  with open(path) as f:
    for i, line in enumerate(f):
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e})") from e
  return out


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def is_done(workdir: str, stage: str) -> bool:
  return os.path.exists(os.path.join(stage_dir(workdir, stage), MANIFEST))


def read_manifest(workdir: str, stage: str) -> dict:
  path = os.path.join(stage_dir(workdir, stage), MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: stage {stage!r} has not finished (run it first)")
  with open(path) as f:
    return json.load(f)


def run_stage(workdir: str, stage: str, fn: Callable[[str], dict], *, log: Callable[[str], None] = print) -> dict:
  """Runs fn(stage_dir) unless the stage's manifest exists; fn returns the manifest (outputs, statistics)."""
  if is_done(workdir, stage):
    log(f"[{stage}] done already ({os.path.join(stage_dir(workdir, stage), MANIFEST)}); skipping")
    return read_manifest(workdir, stage)
  out = stage_dir(workdir, stage)
  os.makedirs(out, exist_ok=True)
  t0 = time.perf_counter()
  log(f"[{stage}] starting")
  manifest = dict(fn(out))
  manifest["seconds"] = round(time.perf_counter() - t0, 2)
  atomic_write_json(os.path.join(out, MANIFEST), manifest)
  log(f"[{stage}] finished in {manifest['seconds']:.1f}s")
  return manifest
