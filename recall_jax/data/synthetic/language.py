"""The synthetic world's language: paraphrase templates for edits, captions and questions, and their parser.

Texts are built from clauses, one attribute each, joined by ", ", " and " or " with ". A clause states an absolute
value ("is red", "has long sleeves", "make it striped instead of dotted") or, for the ordered attributes sleeves and
length, a direction ("is shorter", "has longer sleeves"). The generator only emits a direction when exactly one value
lies that way from the reference, so every generated text pins down its target's attributes exactly.

`parse_statements` inverts the templates (and reads simple free-form clauses over the same vocabulary, e.g. the
captions of `describe_garment`): a text becomes a list of `Statement`s; a clause that names no attribute or holds a
word outside the vocabulary (beyond a few filler words), and a text that contradicts itself, raise `TextParseError`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import numpy as np

from recall_jax.data.synthetic.attributes import ATTRIBUTES, CATEGORIES, ORDERED, VALUES, Garment, rank


class TextParseError(ValueError):
  """A text (or question) that the world's vocabulary cannot read."""


@dataclasses.dataclass(frozen=True)
class Statement:
  """One stated fact: attr == value (op "="), or attr shorter ("<") / longer (">") than the reference's."""

  attr: str
  op: str
  value: Optional[str] = None


# Words naming each value. The first adjective is the canonical one used by captions and questions.
PATTERN_ADJ = {"solid": ("plain", "solid-coloured"), "stripes": ("striped",), "dots": ("dotted", "polka-dot"),
               "checks": ("checked", "checkered"), "zigzag": ("zigzag-patterned", "chevron-patterned")}
PATTERN_NOUN = {"stripes": "stripes", "dots": "dots", "checks": "checks", "zigzag": "a zigzag pattern"}
SLEEVE_NOUN = {"none": "no sleeves", "short": "short sleeves", "long": "long sleeves"}
SLEEVE_ADJ = {"none": "sleeveless", "short": "short-sleeved", "long": "long-sleeved"}
LENGTH_ADJ = {"short": ("short", "mini-length"), "knee": ("knee-length", "midi-length"),
              "long": ("long", "floor-length")}
NECK_NOUN = {"round": ("a round neck", "a crew neck"), "v": ("a v-neck", "a v neckline"),
             "collar": ("a collar",)}
CATEGORY_NOUN = {"dress": "dress", "shirt": "shirt", "toptee": "top"}

# Recognisers, most specific first: a matched span is blanked before the next pattern runs, so "short sleeves" is
# never read as a short length, nor "t-shirt" as a shirt.
_RECOGNISERS: tuple[tuple[str, Statement], ...] = (
    (r"\bsleeveless\b|\bno sleeves\b|\bwithout sleeves\b|\bremove the sleeves\b", Statement("sleeves", "=", "none")),
    (r"\bshort[- ]sleeve[sd]?\b", Statement("sleeves", "=", "short")),
    (r"\blong[- ]sleeve[sd]?\b", Statement("sleeves", "=", "long")),
    (r"\bshorter sleeves\b", Statement("sleeves", "<")),
    (r"\blonger sleeves\b", Statement("sleeves", ">")),
    (r"\b(?:round|crew)[- ]neck(?:line)?\b", Statement("neckline", "=", "round")),
    (r"\bv[- ]neck(?:line)?\b", Statement("neckline", "=", "v")),
    (r"\b(?:add a )?collar(?:ed)?\b", Statement("neckline", "=", "collar")),
    (r"\b(?:knee|midi)[- ]length\b|\bmidi\b", Statement("length", "=", "knee")),
    (r"\bmini(?:[- ]length)?\b", Statement("length", "=", "short")),
    (r"\b(?:floor|maxi)[- ]length\b|\bmaxi\b", Statement("length", "=", "long")),
    (r"\bno pattern\b|\bremove the pattern\b|\bplain\b|\bsolid(?:[- ]colou?red)?\b",
     Statement("pattern", "=", "solid")),
    (r"\bstriped\b|\bstripes\b|\bstripy\b", Statement("pattern", "=", "stripes")),
    (r"\bdotted\b|\bpolka[- ]dots?\b|\bdots\b", Statement("pattern", "=", "dots")),
    (r"\bcheck(?:ed|ered|s)\b|\bplaid\b", Statement("pattern", "=", "checks")),
    (r"\b(?:zigzag|chevron)(?:[- ]patterned| pattern)?\b", Statement("pattern", "=", "zigzag")),
    (r"\btoptee\b|\bt-shirt\b|\btop\b|\btee\b", Statement("category", "=", "toptee")),
    (r"\bdress\b", Statement("category", "=", "dress")),
    (r"\bshirt\b", Statement("category", "=", "shirt")),
    (r"\bgr[ae]y\b", Statement("colour", "=", "grey")),
) + tuple((rf"\b{c}\b", Statement("colour", "=", c)) for c in VALUES["colour"] if c != "grey") + (
    (r"\bshorter\b", Statement("length", "<")),
    (r"\blonger\b", Statement("length", ">")),
    (r"\bshort\b", Statement("length", "=", "short")),
    (r"\blong\b", Statement("length", "=", "long")),
)
_RECOGNISERS_RE = tuple((re.compile(p), s) for p, s in _RECOGNISERS)
_CLAUSE_SPLIT = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+|\s+with\s+|^with\s+|\s*;\s*")
_CONTRAST = re.compile(r"\s*\b(?:instead of|rather than)\b.*$")
_FILLER = re.compile(
    r"\b(?:is|it|make|change|the|a|an|one|to|has|have|give|should|be|more|colou?r|pattern|neckline|length|"
    r"sleeves?|in|now|and|with|please|being|but|its|this|that|so|garment|also)\b|[.!\-']")


def parse_clause(clause: str) -> list[Statement]:
  """Statements of one clause (a contrast tail "instead of X" / "rather than X" names the old value and is dropped)."""
  text = _CONTRAST.sub("", clause.lower()).strip()
  found = []
  for pattern, statement in _RECOGNISERS_RE:
    text, count = pattern.subn(" ", text)
    if count:
      found.append(statement)
  leftover = _FILLER.sub(" ", text).split()
  if leftover:
    raise TextParseError(f"unknown words {leftover} in clause {clause!r}")
  return found


def parse_statements(text: str) -> list[Statement]:
  """The distinct statements of a text (joined captions may repeat a fact in other words; both are kept).

  Raises TextParseError on an unreadable clause or on contradictory statements (two values, or both directions).
  """
  statements: list[Statement] = []
  for clause in _CLAUSE_SPLIT.split(text.strip().rstrip(".!").lower()):
    if not clause.strip():
      continue
    found = parse_clause(clause)
    if not found:
      raise TextParseError(f"clause {clause!r} of {text!r} names no attribute")
    statements.extend(found)
  if not statements:
    raise TextParseError(f"text {text!r} states nothing")
  unique = list(dict.fromkeys(statements))
  for attr in {s.attr for s in unique}:
    about = [s for s in unique if s.attr == attr]
    values = {s.value for s in about if s.op == "="}
    if len(values) > 1 or {"<", ">"} <= {s.op for s in about}:
      raise TextParseError(f"text {text!r} contradicts itself about {attr}: {about}")
  return unique


def holds(statement: Statement, candidate: Garment, reference: Optional[Garment] = None) -> bool:
  """Whether `candidate` satisfies the statement (relative statements compare with `reference`)."""
  value = candidate.get(statement.attr)
  if statement.op == "=":
    return value == statement.value
  if reference is None:
    raise TextParseError(f"relative statement {statement} needs a reference image")
  delta = rank(statement.attr, value) - rank(statement.attr, reference.get(statement.attr))
  return delta < 0 if statement.op == "<" else delta > 0


# ---------------------------------------------------------------------------------------------------------------
# Generation.


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))]


def _unique_direction(attr: str, old: str, new: str) -> Optional[str]:
  """"<" or ">" when `new` is the only value on that side of `old`, else None (a direction would be ambiguous)."""
  i, j, n = rank(attr, old), rank(attr, new), len(VALUES[attr])
  if j == i - 1 == 0:
    return "<"
  if j == i + 1 == n - 1:
    return ">"
  return None


def _old_phrase(attr: str, old: str) -> str:
  phrases = {"colour": lambda: old, "pattern": lambda: PATTERN_ADJ[old][0], "sleeves": lambda: SLEEVE_NOUN[old],
             "length": lambda: LENGTH_ADJ[old][0], "neckline": lambda: NECK_NOUN[old][0]}
  return phrases[attr]()


def _clauses(attr: str, old: str, new: str, imperative: bool) -> tuple[list[str], list[str]]:
  """(clauses, "with"-phrases) stating the change of one attribute from `old` to `new`.

  Descriptive clauses say what the target is ("is red", "has long sleeves"); imperative ones say what to do
  ("make it red", "give it long sleeves"). One text uses one mood.
  """
  direction = _unique_direction(attr, old, new) if attr in ORDERED else None
  relative = "" if direction is None else ("shorter" if direction == "<" else "longer")
  withs: list[str] = []
  if attr == "colour":
    verbs = ([f"make it {new}", f"change the colour to {new}", f"make it {new} in colour"] if imperative
             else [f"is {new}", f"is in {new}", f"is {new} in colour"])
  elif attr == "pattern":
    adj = PATTERN_ADJ[new]
    if imperative:
      verbs = [f"make it {a}" for a in adj] + (["remove the pattern"] if new == "solid" else
                                               [f"give it {PATTERN_NOUN[new]}"])
    else:
      verbs = [f"is {a}" for a in adj] + (["has no pattern"] if new == "solid" else [f"has {PATTERN_NOUN[new]}"])
    if new != "solid":
      withs.append(PATTERN_NOUN[new])
  elif attr == "sleeves":
    if imperative:
      verbs = ["remove the sleeves", "make it sleeveless"] if new == "none" else [
          f"give it {SLEEVE_NOUN[new]}", f"make it {SLEEVE_ADJ[new]}"]
    else:
      verbs = [f"has {SLEEVE_NOUN[new]}", f"is {SLEEVE_ADJ[new]}"]
    withs.append(SLEEVE_NOUN[new])
    if relative:
      verbs.append(f"give it {relative} sleeves" if imperative else f"has {relative} sleeves")
      withs.append(f"{relative} sleeves")
  elif attr == "length":
    verbs = [f"make it {a}" for a in LENGTH_ADJ[new]] if imperative else [f"is {a}" for a in LENGTH_ADJ[new]]
    if relative:
      verbs.append(f"make it {relative}" if imperative else f"is {relative}")
  elif attr == "neckline":
    verbs = [f"give it {n}" for n in NECK_NOUN[new]] if imperative else [f"has {n}" for n in NECK_NOUN[new]]
    if new == "collar":
      verbs.append("add a collar" if imperative else "is collared")
    withs += list(NECK_NOUN[new])
  else:
    raise ValueError(f"unknown attribute {attr!r}")
  return verbs, withs


def compose_edit(reference: Garment, target: Garment, rng: np.random.Generator) -> str:
  """A modification text that turns `reference` into `target` (mood, templates and clause order drawn from `rng`)."""
  if reference.category != target.category:
    raise ValueError(f"edit between categories {reference.category} -> {target.category} is not expressible")
  changed = list(reference.diff(target))
  if not changed:
    raise ValueError(f"reference and target are the same garment {reference}")
  imperative = bool(rng.random() < 0.5)
  order = [changed[i] for i in rng.permutation(len(changed))]
  verb_parts, with_parts = [], []
  for k, attr in enumerate(order):
    old, new = reference.get(attr), target.get(attr)
    verbs, withs = _clauses(attr, old, new, imperative)
    # After the first clause, a "with"-phrase reads naturally ("is red with long sleeves").
    if k > 0 and withs and rng.random() < 0.4:
      with_parts.append(_pick(rng, withs))
      continue
    clause = _pick(rng, verbs)
    if rng.random() < 0.25 and not any(w in clause for w in ("shorter", "longer", "remove")):
      clause += f" {_pick(rng, ('instead of', 'rather than'))} {_old_phrase(attr, old)}"
    verb_parts.append(clause)
  text = verb_parts[0] if len(verb_parts) == 1 else ", ".join(verb_parts[:-1]) + " and " + verb_parts[-1]
  if with_parts:
    text += " with " + " and ".join(with_parts)
  return text


def absolute_clause(attr: str, value: str) -> str:
  """The descriptive clause stating attr == value ("is blue", "has long sleeves", "is plain")."""
  phrases = {"colour": lambda: f"is {value}", "pattern": lambda: f"is {PATTERN_ADJ[value][0]}",
             "sleeves": lambda: f"has {SLEEVE_NOUN[value]}", "length": lambda: f"is {LENGTH_ADJ[value][0]}",
             "neckline": lambda: f"has {NECK_NOUN[value][0]}"}
  if attr not in phrases or value not in VALUES[attr]:
    raise ValueError(f"unknown attribute value {attr}={value!r}")
  return phrases[attr]()


def describe_garment(g: Garment) -> str:
  """A one-sentence caption naming the category and every attribute."""
  pattern = "" if g.pattern == "solid" else PATTERN_ADJ[g.pattern][0] + " "
  return (f"a {g.colour} {pattern}{LENGTH_ADJ[g.length][0]} {CATEGORY_NOUN[g.category]} "
          f"with {SLEEVE_NOUN[g.sleeves]} and {NECK_NOUN[g.neckline][0]}")


def question(attr: str, value: str) -> str:
  """The templated yes/no question asking whether an image has `attr == value` (attr may be "category")."""
  if attr == "category":
    if value not in CATEGORIES:
      raise ValueError(f"unknown category {value!r}")
    return f"Is it a {CATEGORY_NOUN[value]}?"
  if attr not in ATTRIBUTES or value not in VALUES[attr]:
    raise ValueError(f"unknown attribute value {attr}={value!r}")
  if attr == "colour":
    return f"Is it {value}?"
  if attr == "pattern":
    return f"Is it {PATTERN_ADJ[value][0]}?"
  if attr == "sleeves":
    return "Is it sleeveless?" if value == "none" else f"Does it have {SLEEVE_NOUN[value]}?"
  if attr == "length":
    return f"Is it {LENGTH_ADJ[value][0]}?"
  return f"Does it have {NECK_NOUN[value][0]}?"


_QUESTION = re.compile(r"^(?:is it|is the (?:garment|dress|shirt|top)|does it have|"
                       r"does the (?:garment|dress|shirt|top) have|is this|is there)\s+(.*?)\s*\?$")


def parse_question(text: str) -> list[Statement]:
  """The absolute statements a yes/no question asks about ("Is it red?", "Does it have long sleeves?")."""
  m = _QUESTION.match(text.strip().lower())
  if not m:
    raise TextParseError(f"not a yes/no question of the form 'Is it ...?' / 'Does it have ...?': {text!r}")
  if re.search(r"\bor\b|\bnot\b", m.group(1)):
    raise TextParseError(f"question {text!r} uses 'or' / 'not', which this oracle does not answer")
  statements = parse_statements(m.group(1))
  relative = [s for s in statements if s.op != "="]
  if relative:
    raise TextParseError(f"question {text!r} is relative ({relative}); it needs a reference image")
  return statements
