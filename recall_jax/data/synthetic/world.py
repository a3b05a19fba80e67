"""generate_world: the synthetic CIR world on disk, in the FashionIQ / CIRR / CIRCO layouts, plus world.json.

Deterministic: every layout draws from its own child of `np.random.SeedSequence(seed)`, so the same seed gives
byte-identical files (whatever `workers` and whichever subset of layouts is asked for), and nothing written depends
on the root path. world.json (the manifest, also returned) holds the seed, scale, counts, image size, the held-out
combinations and, per layout, its directory (relative to the root) and per-split query / image counts.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import pathlib
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from recall_jax import files
from recall_jax.data.synthetic import layouts as layouts_lib
from recall_jax.data.synthetic import render
from recall_jax.data.synthetic.attributes import ATTRIBUTES, CATEGORIES, HELD_OUT, VALUES
from recall_jax.data.synthetic.triplets import HELD_OUT_QUERY_RATE

LAYOUTS = ("fashioniq", "cirr", "circo")
# Triplets per split (per category and split for FashionIQ).
SCALES: Mapping[str, Mapping[str, Mapping[str, int]]] = {
    "tiny": {"fashioniq": {"train": 6, "val": 4, "test": 3}, "cirr": {"train": 10, "val": 6, "test1": 4},
             "circo": {"val": 5, "test": 4}},
    # val >= 300 queries per FashionIQ category and for CIRR: R@1 differences of a few points are then visible.
    "demo": {"fashioniq": {"train": 350, "val": 300, "test": 40}, "cirr": {"train": 500, "val": 300, "test1": 80},
             "circo": {"val": 50, "test": 50}},
    "large": {"fashioniq": {"train": 4000, "val": 1000, "test": 500},
              "cirr": {"train": 8000, "val": 2000, "test1": 2000}, "circo": {"val": 220, "test": 800}},
}
MANIFEST = "world.json"
PARALLEL_MIN_IMAGES = 1500  # below this, starting worker processes costs more than it saves

Counts = Mapping[str, Mapping[str, int]]


def resolve_counts(scale: Union[str, Counts], layouts: Sequence[str]) -> dict[str, dict[str, int]]:
  """Per-layout, per-split triplet counts from a scale name or an explicit {layout: {split: count}} mapping."""
  if isinstance(scale, str):
    if scale not in SCALES:
      raise ValueError(f"unknown scale {scale!r}; expected one of {tuple(SCALES)} or explicit counts")
    scale = SCALES[scale]
  unknown = set(layouts) - set(LAYOUTS)
  if unknown:
    raise ValueError(f"unknown layouts {sorted(unknown)}; expected a subset of {LAYOUTS}")
  counts = {}
  for layout in layouts:
    if layout not in scale:
      raise ValueError(f"counts give nothing for layout {layout!r}")
    bad = set(scale[layout]) - set(layouts_lib.SPLITS[layout])
    if bad:
      raise ValueError(f"unknown {layout} splits {sorted(bad)}; expected {layouts_lib.SPLITS[layout]}")
    for split, n in scale[layout].items():
      if not isinstance(n, int) or n < 0:
        raise ValueError(f"count for {layout}/{split} must be a non-negative int, got {n!r}")
    counts[layout] = dict(scale[layout])
  return counts


def _write_json(path: os.PathLike, value: Any) -> None:
  files.write_text(path, json.dumps(value, indent=1) + "\n")


def _render_jobs(root: str, jobs: Sequence[tuple[str, Any, Any]], image_size: int) -> None:
  for rel, garment, jitter in jobs:
    fmt = pathlib.PurePath(rel).suffix[1:]
    files.write_bytes(files.path(root) / rel, render.to_bytes(render.render(garment, jitter, image_size), fmt))


def generate_world(root: Union[str, os.PathLike], *, scale: Union[str, Counts] = "tiny", seed: int = 0,
                   image_size: int = 112, layouts: Sequence[str] = LAYOUTS,
                   workers: Optional[int] = None) -> dict[str, Any]:
  """Writes the world under `root` (which must be empty or absent) and returns its manifest (also root/world.json).

  scale: "tiny" (seconds; unit tests), "demo" (a few thousand triplets), "large", or explicit counts
    {layout: {split: triplets}} (FashionIQ counts are per category).
  workers: processes rendering images (1 = in this process; None = 1 for small worlds, else up to 2); the output
    does not depend on it.
  """
  root = files.path(root)  # a local folder or a bucket path
  if root.exists() and any(root.iterdir()):
    raise FileExistsError(f"world root {root} is not empty; remove it or pick another directory")
  if image_size < 28:
    raise ValueError(f"image_size must be >= 28 (one Qwen patch group), got {image_size}")
  counts = resolve_counts(scale, layouts)
  children = np.random.SeedSequence(seed).spawn(len(LAYOUTS))
  manifest: dict[str, Any] = {
      "generator": "recall_jax.data.synthetic", "version": 1, "seed": seed,
      "scale": scale if isinstance(scale, str) else "custom", "image_size": image_size, "counts": counts,
      "held_out": [list(h) for h in HELD_OUT], "held_out_query_rate": HELD_OUT_QUERY_RATE,
      "near_misses_per_triplet": dict(layouts_lib.NEAR_MISSES),
      "vocabulary": {"category": list(CATEGORIES), **{a: list(VALUES[a]) for a in ATTRIBUTES}},
      "layouts": {},
  }
  jobs = []
  for layout in LAYOUTS:
    if layout not in counts:
      continue
    built = layouts_lib.BUILDERS[layout](np.random.default_rng(children[LAYOUTS.index(layout)]), counts[layout])
    for rel, value in built.json_files.items():
      _write_json(root / rel, value)
    for job in built.images:
      _write_json((root / job.path).with_suffix(".json"), job.scene_graph())
      jobs.append((job.path, job.garment, job.jitter))
    manifest["layouts"][layout] = {"dir": layout, "images": len(built.images), "splits": built.summary}

  if workers is None:
    workers = 1 if len(jobs) < PARALLEL_MIN_IMAGES else min(2, os.cpu_count() or 1)
  if workers <= 1:
    _render_jobs(str(root), jobs, image_size)
  else:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      chunks = [jobs[i::workers] for i in range(workers)]
      for f in [pool.submit(_render_jobs, str(root), c, image_size) for c in chunks]:
        f.result()
  _write_json(root / MANIFEST, manifest)
  return manifest


def load_manifest(root: Union[str, os.PathLike]) -> dict[str, Any]:
  path = files.path(root) / MANIFEST
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} not found: {root} is not a generated world") from None
