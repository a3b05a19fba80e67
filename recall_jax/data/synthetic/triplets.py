"""Sampling of triplets (reference -> target, 1-3 attributes changed) with their hard near-misses, and image pools.

A near-miss is the target with exactly one attribute wrong: a stated change not made, made to another value, or an
unstated attribute changed. Every generated text pins the target's attributes exactly (language.py), so a near-miss
never satisfies its triplet's text. Training triplets never touch a held-out (category, colour, pattern) combination;
evaluation triplets force one into about a quarter of their targets, always changing colour or pattern to get there.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recall_jax.data.synthetic.attributes import ATTRIBUTES, HELD_OUT, VALUES, Garment, is_held_out
from recall_jax.data.synthetic.render import Jitter, sample_jitter

HELD_OUT_QUERY_RATE = 0.25


@dataclasses.dataclass(frozen=True)
class Triplet:
  reference: Garment
  target: Garment
  near_misses: tuple[Garment, ...]  # every admissible near-miss, in random order; pools take the first few

  @property
  def changed(self) -> tuple[str, ...]:
    return self.reference.diff(self.target)


def random_garment(rng: np.random.Generator, category: str) -> Garment:
  return Garment(category, *(VALUES[a][int(rng.integers(len(VALUES[a])))] for a in ATTRIBUTES))


def one_off(g: Garment) -> list[Garment]:
  """Every garment that differs from `g` in exactly one attribute, in a fixed order."""
  return [g.replace(**{a: v}) for a in ATTRIBUTES for v in VALUES[a] if v != g.get(a)]


def sample_triplet(rng: np.random.Generator, category: str, *, train: bool) -> Triplet:
  """A random triplet of `category`; training ones avoid the held-out combinations entirely."""
  held = [h for h in HELD_OUT if h[0] == category]
  while True:
    target = random_garment(rng, category)
    forced = not train and held and rng.random() < HELD_OUT_QUERY_RATE
    if forced:
      _, colour, pattern = held[int(rng.integers(len(held)))]
      target = target.replace(colour=colour, pattern=pattern)
    k = int(rng.integers(1, 4))
    changed = [ATTRIBUTES[i] for i in sorted(rng.choice(len(ATTRIBUTES), size=k, replace=False))]
    if forced and not {"colour", "pattern"} & set(changed):
      continue
    reference = target.replace(**{a: _other(rng, a, target.get(a)) for a in changed})
    if train and (is_held_out(target) or is_held_out(reference)):
      continue
    candidates = [g for g in one_off(target) if g != reference and not (train and is_held_out(g))]
    return Triplet(reference, target, tuple(candidates[i] for i in rng.permutation(len(candidates))))


def _other(rng: np.random.Generator, attr: str, value: str) -> str:
  options = [v for v in VALUES[attr] if v != value]
  return options[int(rng.integers(len(options)))]


class ImagePool:
  """The images of one gallery: a garment plus the jitter it is rendered with, indexed by garment."""

  def __init__(self, rng: np.random.Generator):
    self._rng = rng
    self.items: list[tuple[Garment, Jitter]] = []
    self.by_garment: dict[Garment, list[int]] = {}

  def __len__(self) -> int:
    return len(self.items)

  def get(self, g: Garment) -> int:
    """An image of `g`, reusing the first one when the pool has it (keeps targets unique in a gallery)."""
    return self.by_garment[g][0] if g in self.by_garment else self.new(g)

  def new(self, g: Garment) -> int:
    """A fresh image of `g` (another jitter), even if the pool already has one."""
    self.items.append((g, sample_jitter(self._rng)))
    self.by_garment.setdefault(g, []).append(len(self.items) - 1)
    return len(self.items) - 1

  def near_misses(self, t: Triplet, n: int) -> list[int]:
    """`n` distinct near-miss images of `t`, reusing the pool's images first (fewer renders, denser galleries)."""
    have = [g for g in t.near_misses if g in self.by_garment]
    fresh = [g for g in t.near_misses if g not in self.by_garment]
    if len(t.near_misses) < n:
      raise ValueError(f"{t} has only {len(t.near_misses)} admissible near-misses, {n} asked")
    return [self.get(g) for g in (have + fresh)[:n]]
