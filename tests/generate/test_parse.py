"""Parsing the model's rewrites: JSON in its three wrappings, span reconstruction, validators, and no exception on
any malformed output."""

import json

import numpy as np
import pytest

from recall_jax.generate import parse

ORIGINAL = "is red with long sleeves and has a collar"


def _minimal(segments, final="whatever"):
  return json.dumps({"visual_summary": "x", "segments": segments, "final_text": final})


@pytest.mark.parametrize("raw", [
    '{"a": 1}',
    'Sure! Here it is:\n```json\n{"a": 1}\n```\nDone.',
    '```\n{"a": 1}\n```',
    'The answer is {"a": 1} as requested.',
    '  \n{"a": 1}\n',
])
def test_extract_json_wrappings(raw):
  assert parse.extract_json(raw) == ({"a": 1}, "ok")


def test_extract_json_fenced_block_wins_over_outer_braces():
  raw = 'Note {not json} then ```json\n{"b": 2}\n``` and {junk}'
  assert parse.extract_json(raw) == ({"b": 2}, "ok")


@pytest.mark.parametrize("raw,reason", [
    ("", "no_json"), ("no braces at all", "no_json"), ("{", "no_json"), ("}{", "no_json"),
    ('{"a": 1', "no_json"), ("[1, 2]", "not_an_object"), ('"a string"', "not_an_object"), ("42", "not_an_object"),
    (None, "no_json"), ("[" * 100000, "no_json"), ("{" * 50000 + "}" * 50000, "no_json"),
])
def test_extract_json_failures(raw, reason):
  assert parse.extract_json(raw) == (None, reason)


def test_minimal_json_rebuilds_spans_in_order_and_the_rebuilt_text_wins():
  raw = _minimal([{"original": "red", "new": "blue", "reason": "r"},
                  {"original": "a collar", "new": "a v-neck", "reason": "r"}], final="a different text")
  result = parse.parse_minimal_json(raw, ORIGINAL)
  assert result.reason == "ok"
  assert result.text == "is blue with long sleeves and has a v-neck"
  assert result.model_text == "a different text"
  assert result.statements == ("blue", "a v-neck")


def test_minimal_json_deletion_is_tidied():
  raw = _minimal([{"original": " with long sleeves", "new": "", "reason": "r"}])
  assert parse.parse_minimal_json(raw, ORIGINAL).text == "is red and has a collar"
  raw = _minimal([{"original": "is red with long sleeves and", "new": "", "reason": "r"}])
  assert parse.parse_minimal_json(raw, ORIGINAL).text == "has a collar"


@pytest.mark.parametrize("segments,reason", [
    ([{"original": "green", "new": "blue"}], "span_not_found"),
    ([{"original": "a collar", "new": "x"}, {"original": "red", "new": "y"}], "span_not_found"),  # out of order
    ([{"original": "RED", "new": "blue"}], "span_not_found"),  # verbatim means case too
    ([{"original": "", "new": "blue"}], "empty_span"),
    ([{"original": "red"}], "bad_segment"),
    ([{"original": "red", "new": 3}], "bad_segment"),
    (["red -> blue"], "bad_segment"),
    ("red -> blue", "bad_field_type"),
    ([], "unchanged"),
    ([{"original": "red", "new": "red"}], "unchanged"),
    ([{"original": ORIGINAL, "new": ""}], "empty"),
    ([{"original": "red", "new": "x" * 400}], "too_long"),
    ([{"original": "is red", "new": "is blue instead of blue"}], "self_contradiction"),
])
def test_minimal_json_rejections(segments, reason):
  result = parse.parse_minimal_json(_minimal(segments), ORIGINAL)
  assert (result.text, result.reason) == (None, reason)


def test_minimal_json_uncertain_and_missing_segments():
  assert parse.parse_minimal_json('{"final_text": "Uncertain: cannot see"}', ORIGINAL).reason == "uncertain"
  assert parse.parse_minimal_json('{"final_text": "is blue"}', ORIGINAL).reason == "missing_field"


def test_staged_cot():
  intents = [{"span": "is red", "intent": "colour red", "type": "absolute", "question": "Is it red?",
              "answer": "no", "edit": "rewrite", "new_span": "is blue"},
             {"span": "has a collar", "edit": "keep", "new_span": "has a collar"},
             {"span": "with long sleeves", "edit": "delete", "new_span": ""}]
  raw = "```json\n" + json.dumps({"captions": {}, "intents": intents, "new_text": " is blue and has a collar "}) + "```"
  result = parse.parse_staged_cot(raw, ORIGINAL)
  assert (result.text, result.reason) == ("is blue and has a collar", "ok")
  assert result.statements == ("is blue", "has a collar")


@pytest.mark.parametrize("obj,reason", [
    ({"intents": []}, "missing_field"),
    ({"new_text": ["is blue"]}, "bad_field_type"),
    ({"new_text": "is blue", "intents": "one"}, "bad_field_type"),
    ({"new_text": "is blue", "intents": ["one"]}, "bad_field_type"),
    ({"new_text": "is blue", "intents": [{}] * 7}, "too_many_intents"),
    ({"new_text": "   "}, "empty"),
    ({"new_text": "uncertain"}, "uncertain"),
    ({"new_text": ORIGINAL}, "unchanged"),
])
def test_staged_cot_rejections(obj, reason):
  assert parse.parse_staged_cot(json.dumps(obj), ORIGINAL) == parse.ParseResult(None, reason)


@pytest.mark.parametrize("text,contradiction", [
    ("is red instead of red", True),
    ("has long sleeves rather than long sleeves", True),
    ("make it a collar instead of a collar and blue", True),
    ("is blue, has a collar instead of the collar", True),
    ("is red instead of blue", False),
    ("has short sleeves instead of long sleeves", False),
    ("is red instead of blue and red", False),  # the second red is in another clause
    ("is long instead of long-sleeved", False),
    ("instead of red", False),
])
def test_contradicting_contrast_clauses(text, contradiction):
  assert parse.contradicts_itself(text) is contradiction


def test_validate_text():
  assert parse.validate_text("is blue", ORIGINAL) == "ok"
  assert parse.validate_text("x" * 300) == "ok"
  assert parse.validate_text("x" * 301) == "too_long"
  assert parse.validate_text("") == "empty"
  assert parse.validate_text("UNCERTAIN") == "uncertain"
  assert parse.validate_text("Is red with long sleeves and has a collar", ORIGINAL) == "unchanged"


def test_never_raises_on_random_and_mangled_outputs():
  good = _minimal([{"original": "red", "new": "blue"}])
  rng = np.random.default_rng(0)
  alphabet = list('{}[]":,`\\ \nabcdejsonfinal_textsegmentsoriginalnew0123456789.-')
  samples = [good[:i] for i in range(len(good))]  # every truncation, as max_new_tokens cuts generations
  samples += ["".join(rng.choice(alphabet, size=rng.integers(0, 200))) for _ in range(300)]
  samples += [json.dumps(v) for v in (None, True, 1.5, "x", [], {}, {"segments": None}, {"segments": [None]},
                                      {"segments": [{"original": None, "new": None}]}, {"new_text": None},
                                      {"new_text": "a", "intents": [{"edit": None, "new_span": 5, "span": []}]},
                                      {"final_text": 7, "segments": []})]
  samples += ["\x00\ud800{}", "```json\n", "```json\n{\"a\":", "{\"new_text\": \"é\\u0000\"}", "1e999999"]
  reasons = set()
  for raw in samples:
    for mode in parse.MODES:
      result = parse.parse_rewrite(raw, ORIGINAL, mode)
      assert (result.text is None) == (result.reason != "ok")
      assert result.reason == "ok" or result.reason in parse.REASONS
      reasons.add(result.reason)
  assert len(reasons) >= 5


def test_unknown_mode():
  with pytest.raises(ValueError, match="calibrate.prompt_mode"):
    parse.parse_rewrite("{}", ORIGINAL, "free_text")


def test_a_lone_surrogate_is_rejected_not_passed_on():
  # json.loads turns an escaped lone surrogate into a str that no UTF-8 file or tokenizer can hold.
  raw = '{"new_text": "is red \\ud83d", "intents": [{"span": "x", "edit": "keep", "new_span": "red \\ud83d"}]}'
  assert parse.parse_rewrite(raw, "is blue", "staged_cot").reason == "not_utf8"
  raw = '{"segments": [{"original": "blue", "new": "red \\udc00"}]}'
  assert parse.parse_rewrite(raw, "is blue", "minimal_json").reason == "not_utf8"
  ok = parse.parse_rewrite('{"new_text": "is red \\ud83d\\ude00"}', "is blue", "staged_cot")  # a valid pair
  assert ok.reason == "ok" and ok.text.encode("utf-8")
