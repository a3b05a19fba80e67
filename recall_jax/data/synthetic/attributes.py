"""The synthetic garment world's vocabulary: categories, attributes, their values, and the held-out combinations.

A garment is fully described by its category and five attributes. `sleeves` and `length` are ordered (so "shorter"
and "longer" have a meaning); the others are nominal. The scene graph of an image is `Garment.to_json()` plus the
nuisance jitter it was rendered with (see render.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

CATEGORIES = ("dress", "shirt", "toptee")

# RGB of each named colour; chosen to stay distinguishable after the renderer's small hue/brightness jitter.
COLOURS = {
    "red": (205, 30, 40),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 40),
    "green": (40, 150, 60),
    "blue": (35, 75, 205),
    "purple": (125, 45, 165),
    "pink": (245, 135, 190),
    "black": (25, 25, 25),
    "white": (248, 248, 248),
    "grey": (130, 130, 130),
    "brown": (115, 70, 30),
}
PATTERNS = ("solid", "stripes", "dots", "checks", "zigzag")
SLEEVES = ("none", "short", "long")  # ordered, shortest first
LENGTHS = ("short", "knee", "long")  # ordered, shortest first
NECKLINES = ("round", "v", "collar")

ATTRIBUTES = ("colour", "pattern", "sleeves", "length", "neckline")
VALUES: Mapping[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "sleeves": SLEEVES,
    "length": LENGTHS,
    "neckline": NECKLINES,
}
ORDERED = ("sleeves", "length")

# (category, colour, pattern) never seen in any training image, reference, target or near-miss; val/test queries
# deliberately compose them (about a quarter of their targets) to measure generalisation to unseen combinations.
HELD_OUT = (
    ("dress", "red", "dots"),
    ("dress", "blue", "checks"),
    ("shirt", "green", "stripes"),
    ("shirt", "black", "zigzag"),
    ("toptee", "pink", "checks"),
    ("toptee", "yellow", "stripes"),
)


@dataclasses.dataclass(frozen=True, order=True)
class Garment:
  """The semantic content of one image: what the oracles reason about (jitter excluded)."""

  category: str
  colour: str
  pattern: str
  sleeves: str
  length: str
  neckline: str

  def __post_init__(self):
    if self.category not in CATEGORIES:
      raise ValueError(f"unknown category {self.category!r}; expected one of {CATEGORIES}")
    for attr in ATTRIBUTES:
      if getattr(self, attr) not in VALUES[attr]:
        raise ValueError(f"unknown {attr} {getattr(self, attr)!r}; expected one of {VALUES[attr]}")

  def get(self, attr: str) -> str:
    if attr != "category" and attr not in ATTRIBUTES:
      raise KeyError(f"unknown attribute {attr!r}")
    return getattr(self, attr)

  def replace(self, **changes: str) -> "Garment":
    return dataclasses.replace(self, **changes)

  def diff(self, other: "Garment") -> tuple[str, ...]:
    """Attributes (in ATTRIBUTES order) whose values differ; category is not an attribute here."""
    return tuple(a for a in ATTRIBUTES if getattr(self, a) != getattr(other, a))

  def to_json(self) -> dict[str, str]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "Garment":
    missing = [k for k in ("category",) + ATTRIBUTES if k not in data]
    if missing:
      raise ValueError(f"scene graph lacks {missing}")
    return cls(**{k: data[k] for k in ("category",) + ATTRIBUTES})


def is_held_out(g: Garment) -> bool:
  return (g.category, g.colour, g.pattern) in HELD_OUT


def rank(attr: str, value: str) -> int:
  """Position of `value` on an ordered attribute's scale."""
  if attr not in ORDERED:
    raise ValueError(f"{attr!r} is not ordered; ordered attributes are {ORDERED}")
  return VALUES[attr].index(value)
