"""Parsing and validating the foundation model's rewrites (Stage 3). Never raises on model output.

Every function here takes arbitrary generated text and returns either the rewrite or the reason it was rejected, so
the stage can count rejections by reason:
  * the JSON object is read directly, from a ```json fenced block, or between the outermost braces;
  * minimal-JSON mode rebuilds the final text by replacing each segment's original span (which must occur verbatim
    in the original text, in order) by its new span; the rebuilt text wins over the model's own final text;
  * staged-CoT mode takes the model's new text; its intents (at most 6) give per-intent statements for the optional
    decomposed verification;
  * validators (the paper's filters of generated texts): empty, longer than 300 characters, starting with "uncertain", a contrast clause
    that contradicts itself ("red instead of red"); ours in addition: a rewrite equal to the original text.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Optional

MAX_CHARS = 300
MAX_INTENTS = 6
OK = "ok"
# Every rejection reason, in pipeline order (parsing, then reconstruction, then validation).
REASONS = ("no_json", "not_an_object", "missing_field", "bad_field_type", "bad_segment", "empty_span",
           "span_not_found", "too_many_intents", "not_utf8", "empty", "too_long", "uncertain", "self_contradiction", "unchanged")
MODES = ("minimal_json", "staged_cot")

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_CONTRAST = re.compile(r"\b(?:instead of|rather than)\b", re.IGNORECASE)
# Where a clause ends: the two sides of a contrast are compared within their own clause only.
_CLAUSE_BOUNDARY = re.compile(r"[,;.!?]|\b(?:and|but|with|while|or)\b", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
_FILLER = frozenset({"a", "an", "the", "it", "its", "is", "are", "be", "being", "in", "of", "to", "make", "made",
                     "has", "have", "having", "one", "that", "this", "some"})


@dataclasses.dataclass(frozen=True)
class ParseResult:
  """text: the validated rewrite (None when rejected); reason: "ok" or one of REASONS;
  statements: per-intent statements true of the instance (decomposed verification);
  model_text: the model's own final text (minimal-JSON mode; the rebuilt `text` is what is used)."""

  text: Optional[str]
  reason: str
  statements: tuple[str, ...] = ()
  model_text: Optional[str] = None


def _reject(reason: str, model_text: Optional[str] = None) -> ParseResult:
  return ParseResult(text=None, reason=reason, model_text=model_text)


def extract_json(raw: Any) -> tuple[Optional[dict], str]:
  """(the first JSON object found, "ok") trying the whole text, fenced blocks, then the outermost braces;
  (None, "no_json" | "not_an_object") otherwise."""
  if not isinstance(raw, str):
    return None, "no_json"
  candidates = [raw.strip(), *(m.group(1).strip() for m in _FENCE.finditer(raw))]
  start, end = raw.find("{"), raw.rfind("}")
  if 0 <= start < end:
    candidates.append(raw[start:end + 1])
  found_other = False
  for candidate in candidates:
    try:
      value = json.loads(candidate)
    except (ValueError, RecursionError):  # malformed, or absurdly nested
      continue
    if isinstance(value, dict):
      return value, OK
    found_other = True
  return None, "not_an_object" if found_other else "no_json"


def clean_text(text: str) -> str:
  """Whitespace collapsed, no space before punctuation, one pair of surrounding quotes and stray edge commas
  removed (what span deletions and quoting models leave behind)."""
  text = re.sub(r"\s+", " ", text).strip()
  if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
    text = text[1:-1].strip()
  text = re.sub(r" ([,.;:!?])", r"\1", text)
  text = re.sub(r",(\s*,)+", ",", text)
  return text.strip(" ,;")


def _content_words(text: str) -> set[str]:
  return {w for w in _WORD.findall(text.lower()) if w not in _FILLER}


def contradicts_itself(text: str) -> bool:
  """A contrast clause whose rejected side adds nothing to its accepted side: "is red instead of red", "has long
  sleeves rather than long sleeves". Each side is read within its own clause (up to , ; . and/but/with/or)."""
  for m in _CONTRAST.finditer(text):
    before = _CLAUSE_BOUNDARY.split(text[:m.start()])[-1]
    after = _CLAUSE_BOUNDARY.split(text[m.end():])[0]
    rejected = _content_words(after)
    if rejected and rejected <= _content_words(before):
      return True
  return False


def _is_utf8(text: str) -> bool:
  """False for text no UTF-8 file or tokenizer can hold, e.g. a lone surrogate a generation escaped into JSON."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def validate_text(text: str, original: Optional[str] = None) -> str:
  """"ok" or the first validator that rejects the (cleaned) text."""
  if not _is_utf8(text):
    return "not_utf8"
  if not text:
    return "empty"
  if len(text) > MAX_CHARS:
    return "too_long"
  if text.lower().startswith("uncertain"):
    return "uncertain"
  if contradicts_itself(text):
    return "self_contradiction"
  if original is not None and text.lower() == clean_text(original).lower():
    return "unchanged"
  return OK


def rebuild_from_spans(original: str, segments: Any) -> tuple[Optional[str], str]:
  """Replaces each segment's "original" span by its "new" span, searching left to right from the end of the
  previous span; (cleaned text, "ok") or (None, reason)."""
  if not isinstance(segments, list):
    return None, "bad_field_type"
  pieces, cursor = [], 0
  for segment in segments:
    if not isinstance(segment, dict):
      return None, "bad_segment"
    old, new = segment.get("original"), segment.get("new")
    if not isinstance(old, str) or not isinstance(new, str):
      return None, "bad_segment"
    if not old:
      return None, "empty_span"
    at = original.find(old, cursor)
    if at < 0:
      return None, "span_not_found"
    pieces += [original[cursor:at], " ", new, " "]  # spaces keep words apart; clean_text collapses them
    cursor = at + len(old)
  pieces.append(original[cursor:])
  return clean_text("".join(pieces)), OK


def parse_minimal_json(raw: Any, original: str) -> ParseResult:
  obj, reason = extract_json(raw)
  if obj is None:
    return _reject(reason)
  model_text = obj.get("final_text")
  model_text = model_text if isinstance(model_text, str) else None
  if model_text is not None and clean_text(model_text).lower().startswith("uncertain"):
    return _reject("uncertain", model_text)
  if "segments" not in obj:
    return _reject("missing_field", model_text)
  text, reason = rebuild_from_spans(original, obj["segments"])
  if text is None:
    return _reject(reason, model_text)
  reason = validate_text(text, original)
  if reason != OK:
    return _reject(reason, model_text)
  statements = tuple(clean_text(s["new"]) for s in obj["segments"] if clean_text(s["new"]) and _is_utf8(s["new"]))
  return ParseResult(text=text, reason=OK, statements=statements, model_text=model_text)


def parse_staged_cot(raw: Any, original: str) -> ParseResult:
  obj, reason = extract_json(raw)
  if obj is None:
    return _reject(reason)
  if "new_text" not in obj:
    return _reject("missing_field")
  if not isinstance(obj["new_text"], str):
    return _reject("bad_field_type")
  intents = obj.get("intents", [])
  if not isinstance(intents, list) or not all(isinstance(i, dict) for i in intents):
    return _reject("bad_field_type")
  if len(intents) > MAX_INTENTS:
    return _reject("too_many_intents")
  text = clean_text(obj["new_text"])
  reason = validate_text(text, original)
  if reason != OK:
    return _reject(reason)
  statements = []
  for intent in intents:
    if intent.get("edit") == "delete":
      continue
    span = intent.get("new_span") if isinstance(intent.get("new_span"), str) else intent.get("span")
    if isinstance(span, str) and clean_text(span) and _is_utf8(span):
      statements.append(clean_text(span))
  return ParseResult(text=text, reason=OK, statements=tuple(statements))


def parse_rewrite(raw: Any, original: str, mode: str) -> ParseResult:
  """The rewrite of `original` in a generation of prompt mode `mode` ("minimal_json" | "staged_cot")."""
  if mode == "minimal_json":
    return parse_minimal_json(raw, original)
  if mode == "staged_cot":
    return parse_staged_cot(raw, original)
  raise ValueError(f"unknown prompt mode {mode!r} (config calibrate.prompt_mode); expected one of {MODES}")
