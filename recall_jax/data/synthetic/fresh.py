"""Fresh garments from the world's generator, rendered in memory: pretraining images for a tiny vision tower.

A real MLLM's vision tower was pretrained on far more images than a CIR training split holds. The world can stand in
for that corpus: it renders new garments of the training combinations only (never a held-out one, so the
compositional val/test queries stay unseen), with fresh nuisance jitter. Each image goes through the world's file
format (PNG / JPEG bytes), so it carries the compression of the files the stages read.
"""

from __future__ import annotations

import io
from typing import Sequence, Union

import numpy as np
from PIL import Image

from recall_jax.data.synthetic import render
from recall_jax.data.synthetic.attributes import CATEGORIES, Garment, is_held_out
from recall_jax.data.synthetic.triplets import random_garment


Seed = Union[int, Sequence[int]]  # a numpy seed: an int, or ints mixed into one stream


def fresh_garments(n: int, seed: Seed) -> list[Garment]:
  """n garments of uniformly drawn categories and attribute values, held-out combinations excluded; a pure function
  of (n, seed)."""
  rng = np.random.default_rng([*map(int, np.atleast_1d(seed)), 0])
  out: list[Garment] = []
  while len(out) < n:
    g = random_garment(rng, CATEGORIES[int(rng.integers(len(CATEGORIES)))])
    if not is_held_out(g):
      out.append(g)
  return out


def render_fresh(n: int, *, seed: Seed, image_size: int, fmt: str = "png") -> tuple[list[Image.Image], list[Garment]]:
  """(RGB images, their garments) of `fresh_garments(n, seed)`, each rendered with its own jitter and decoded back
  from `fmt` bytes."""
  garments = fresh_garments(n, seed)
  jitter_rng = np.random.default_rng([*map(int, np.atleast_1d(seed)), 1])
  images = []
  for g in garments:
    data = render.to_bytes(render.render(g, render.sample_jitter(jitter_rng), image_size), fmt)
    images.append(Image.open(io.BytesIO(data)).convert("RGB"))
  return images, garments
