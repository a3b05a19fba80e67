"""Typed records shared by the readers, the Grain pipelines, the stages and the evaluators.

Everything downstream of a reader sees only these types, never dataset-specific JSON.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional


@dataclasses.dataclass(frozen=True)
class Query:
  """One CIR query (or training triplet when `targets` is set).

  qid:       stable id (CIRR pairid, CIRCO id, FashionIQ "<category>/<index>", synthetic id).
  reference: image name (a key of `CIRSplit.images`).
  captions:  modification text(s); FashionIQ has two, joined at prompt time by the protocol in use.
  targets:   ground-truth image names; empty on test splits. CIRR/FashionIQ have one, CIRCO several.
  category:  FashionIQ category (dress / shirt / toptee) or the synthetic world's category; None for CIRR/CIRCO.
  subset:    CIRR `img_set.members` (6 names, the reference among them); empty elsewhere.
  group:     micro-group key (reference + original text) for grouped batching; corrective siblings share it.
  source:    "<file>#<record index>" so every later error can name where the record came from.
  negative_only: training only: the target is an extra in-batch negative (its query is no loss row), e.g. a mined
             hard negative of its group's original query (refine.mode = "hard_negative").
  """

  qid: str
  reference: str
  captions: tuple[str, ...]
  targets: tuple[str, ...] = ()
  category: Optional[str] = None
  subset: tuple[str, ...] = ()
  group: Optional[str] = None
  source: str = ""
  negative_only: bool = False

  @property
  def target(self) -> Optional[str]:
    return self.targets[0] if self.targets else None

  @property
  def group_key(self) -> str:
    return self.group if self.group is not None else f"{self.reference}\x1f{' / '.join(self.captions)}"


@dataclasses.dataclass(frozen=True)
class CIRSplit:
  """A split of a CIR dataset, as the evaluator and the pipelines consume it.

  dataset:  "fashioniq" | "cirr" | "circo" (the file layout it was read from).
  split:    "train" | "val" | "test" (CIRR "test1").
  category: FashionIQ category (one CIRSplit per category), else None.
  queries:  the queries, in file order.
  images:   image name -> absolute file path, for every image the split may touch.
  gallery:  names of the retrieval gallery, in a fixed order (ranking ties break by this order).
  skipped:  (source, reason) of records dropped by `on_error="skip"`; empty when reading was strict.
  """

  dataset: str
  split: str
  queries: tuple[Query, ...]
  images: Mapping[str, str]
  gallery: tuple[str, ...]
  category: Optional[str] = None
  skipped: tuple[tuple[str, str], ...] = ()


class DataError(ValueError):
  """A dataset file or record is missing, unreadable or malformed; the message names the file and record."""
