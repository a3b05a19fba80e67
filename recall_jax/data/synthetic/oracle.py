"""Oracles over scene graphs, for measuring the pipeline: describe, answer, edit and judge.

The module-level functions are pure functions of `Garment`s. `Oracle` applies them to image names, reading each
image's scene graph from the JSON file beside it (same stem, `.json`), e.g. `Oracle(split.images)` for a CIRSplit.

Question forms `answer` reads (case-insensitive, the templated ones are what `language.question` writes):
  "Is it <colour | pattern adjective | length adjective | sleeveless | a dress/shirt/top>?",
  "Does it have <short/long/no sleeves | a round neck | a crew neck | a v-neck | a collar | stripes | dots ...>?".
Several attributes in one question ("Is it a red dress?") must all hold. Relative questions ("Is it shorter?"),
'or'/'not' questions and words outside the vocabulary raise `TextParseError`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping, Optional

import numpy as np

from recall_jax import files
from recall_jax.data.synthetic import language
from recall_jax.data.synthetic.attributes import VALUES, Garment, rank


def describe(image: Garment) -> str:
  return language.describe_garment(image)


def answer(image: Garment, question: str) -> bool:
  return all(language.holds(s, image) for s in language.parse_question(question))


def edit(reference: Garment, target: Garment, variant: int = 0) -> str:
  """A modification text from reference to target; `variant` picks among the paraphrases, deterministically."""
  return language.compose_edit(reference, target, np.random.default_rng([variant]))


def judge(reference: Garment, text: str, candidate: Garment) -> bool:
  """Whether `candidate` is a correct target for (reference, text).

  Every change the text states holds for the candidate, the category and every attribute the text does not mention
  are kept from the reference. Raises `TextParseError` when the text cannot be read.
  """
  statements = language.parse_statements(text)
  if candidate.category != reference.category and not any(s.attr == "category" for s in statements):
    return False
  mentioned = {s.attr for s in statements}
  kept = all(a in mentioned for a in reference.diff(candidate))
  return kept and all(language.holds(s, candidate, reference) for s in statements)


def implied(reference: Garment, text: str) -> Optional[Garment]:
  """The one garment `text` describes from `reference`: its stated values set, a direction resolved to the single
  value that lies that way, the rest kept. None when a direction leaves several values (the text pins down no one
  garment). judge(reference, text, c) holds exactly for c == implied(reference, text) when it is not None.
  Raises `TextParseError` when the text cannot be read."""
  changes = {}
  for s in language.parse_statements(text):
    if s.op == "=":
      changes[s.attr] = s.value
      continue
    here = rank(s.attr, reference.get(s.attr))
    values = VALUES[s.attr]
    side = values[:here] if s.op == "<" else values[here + 1:]
    if len(side) != 1:
      return None
    changes[s.attr] = side[0]
  return reference.replace(**changes)


def load_scene_graph(image_path: str | pathlib.Path) -> Garment:
  """The garment of an image, from the scene graph JSON beside it."""
  path = files.path(image_path).with_suffix(".json")  # beside a local image or one in a bucket
  try:
    data = json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"no scene graph {path} beside image {image_path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"malformed scene graph {path}: {e}") from None
  try:
    return Garment.from_json(data)
  except (ValueError, TypeError) as e:
    raise ValueError(f"bad scene graph {path}: {e}") from None


class Oracle:
  """The oracles over image names; `images` maps a name to its image path (CIRSplit.images)."""

  def __init__(self, images: Mapping[str, str]):
    self._images = images
    self._cache: dict[str, Garment] = {}

  def garment(self, name: str) -> Garment:
    if name not in self._cache:
      if name not in self._images:
        raise KeyError(f"unknown image {name!r}")
      self._cache[name] = load_scene_graph(self._images[name])
    return self._cache[name]

  def describe(self, name: str) -> str:
    return describe(self.garment(name))

  def answer(self, name: str, question: str) -> bool:
    return answer(self.garment(name), question)

  def edit(self, reference: str, target: str, variant: int = 0) -> str:
    return edit(self.garment(reference), self.garment(target), variant)

  def judge(self, reference: str, text: str, candidate: str) -> bool:
    return judge(self.garment(reference), text, self.garment(candidate))
