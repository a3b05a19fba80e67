"""Oracles and the edit language: generated texts are judged true for their target and false for every near-miss,
answers agree with the scene graph, and unreadable texts and questions raise."""

import json

import numpy as np
import pytest

from recall_jax.data.synthetic import language, oracle
from recall_jax.data.synthetic.attributes import ATTRIBUTES, CATEGORIES, VALUES, Garment
from recall_jax.data.synthetic.triplets import one_off, random_garment, sample_triplet


def _triplets(n, seed=0):
  rng = np.random.default_rng(seed)
  return [sample_triplet(rng, CATEGORIES[i % 3], train=bool(i % 2)) for i in range(n)]


def test_judge_accepts_every_paraphrase_of_the_edit_and_rejects_every_near_miss():
  for i, t in enumerate(_triplets(300)):
    for variant in range(3):
      text = oracle.edit(t.reference, t.target, variant=7 * i + variant)
      assert oracle.judge(t.reference, text, t.target), text
      # The text pins the target exactly: every garment one attribute away fails, including the near-misses.
      for wrong in one_off(t.target):
        assert not oracle.judge(t.reference, text, wrong), (text, wrong)
      assert not oracle.judge(t.reference, text, t.reference)


def test_implied_is_the_one_garment_the_judge_accepts():
  for i, t in enumerate(_triplets(200, seed=5)):
    text = oracle.edit(t.reference, t.target, variant=i)
    assert oracle.implied(t.reference, text) == t.target, text
    for wrong in (t.reference, *one_off(t.target)):
      assert oracle.judge(t.reference, text, wrong) == (wrong == oracle.implied(t.reference, text))
  g = Garment("dress", "red", "solid", "long", "knee", "round")
  assert oracle.implied(g, "is shorter") == g.replace(length="short")  # one value that way
  assert oracle.implied(g, "has shorter sleeves") is None  # "none" and "short" both lie that way
  assert oracle.implied(g, "is red") == g


def test_judge_of_joined_captions_and_other_category():
  t = _triplets(1, seed=3)[0]
  joined = oracle.edit(t.reference, t.target, 0) + " and " + oracle.edit(t.reference, t.target, 1)
  assert oracle.judge(t.reference, joined, t.target)
  other = next(c for c in CATEGORIES if c != t.target.category)
  assert not oracle.judge(t.reference, oracle.edit(t.reference, t.target), t.target.replace(category=other))


def test_edit_is_deterministic_and_paraphrases_vary():
  t = _triplets(1, seed=5)[0]
  assert oracle.edit(t.reference, t.target, 4) == oracle.edit(t.reference, t.target, 4)
  assert len({oracle.edit(t.reference, t.target, v) for v in range(20)}) > 3


@pytest.mark.parametrize("text, expected", [
    ("is red with long sleeves", {("colour", "=", "red"), ("sleeves", "=", "long")}),
    ("make it striped instead of dotted", {("pattern", "=", "stripes")}),
    ("has no sleeves and is shorter", {("sleeves", "=", "none"), ("length", "<", None)}),
    ("Is Knee-Length, with a V-neck.", {("length", "=", "knee"), ("neckline", "=", "v")}),
    ("has shorter sleeves, is grey", {("sleeves", "<", None), ("colour", "=", "grey")}),
])
def test_parse_statements_reads_the_documented_forms(text, expected):
  got = {(s.attr, s.op, s.value) for s in language.parse_statements(text)}
  assert got == expected


@pytest.mark.parametrize("text, message", [
    ("is fluffy", "unknown words"),
    ("", "states nothing"),
    ("is red and is blue", "contradicts itself about colour"),
    ("is shorter and is longer", "contradicts itself about length"),
])
def test_parse_statements_raises_on_unreadable_text(text, message):
  with pytest.raises(language.TextParseError, match=message):
    language.parse_statements(text)


def test_judge_relative_length():
  ref = Garment("dress", "red", "solid", "short", "knee", "round")
  assert oracle.judge(ref, "is shorter", ref.replace(length="short"))
  assert not oracle.judge(ref, "is shorter", ref.replace(length="long"))
  assert not oracle.judge(ref, "is shorter", ref.replace(length="short", colour="blue"))


def test_answer_agrees_with_the_scene_graph_on_every_templated_question():
  rng = np.random.default_rng(0)
  for _ in range(30):
    g = random_garment(rng, CATEGORIES[int(rng.integers(3))])
    for attr in ATTRIBUTES:
      for value in VALUES[attr]:
        assert oracle.answer(g, language.question(attr, value)) == (g.get(attr) == value)
    for cat in CATEGORIES:
      assert oracle.answer(g, language.question("category", cat)) == (g.category == cat)


def test_answer_reads_free_form_questions_and_rejects_the_rest():
  g = Garment("shirt", "red", "checks", "long", "knee", "collar")
  assert oracle.answer(g, "Is it red?")
  assert oracle.answer(g, "Does it have long sleeves?")
  assert oracle.answer(g, "Is the shirt checkered?")
  assert oracle.answer(g, "Is it a red shirt?")
  assert not oracle.answer(g, "Is it a red dress?")
  assert not oracle.answer(g, "Is it sleeveless?")
  for bad in ("Is it shorter?", "Is it red or blue?", "Is it fluffy?", "What colour is it?"):
    with pytest.raises(language.TextParseError):
      oracle.answer(g, bad)


def test_describe_names_every_attribute_and_parses_back():
  g = Garment("toptee", "blue", "zigzag", "none", "short", "v")
  text = oracle.describe(g)
  assert text == "a blue zigzag-patterned short top with no sleeves and a v-neck"
  stated = {(s.attr, s.value) for s in language.parse_statements(text)}
  assert stated == {("category", "toptee"), ("colour", "blue"), ("pattern", "zigzag"), ("sleeves", "none"),
                    ("length", "short"), ("neckline", "v")}


def test_oracle_over_image_names_reads_scene_graphs(tmp_path):
  ref = Garment("dress", "red", "solid", "short", "knee", "round")
  tgt = ref.replace(colour="blue", pattern="dots")
  images = {}
  for name, g in (("a", ref), ("b", tgt)):
    (tmp_path / f"{name}.json").write_text(json.dumps({**g.to_json(), "jitter": {}}))
    images[name] = str(tmp_path / f"{name}.png")
  o = oracle.Oracle(images)
  assert o.judge("a", o.edit("a", "b"), "b")
  assert o.answer("b", "Is it dotted?") and not o.answer("a", "Is it dotted?")
  (tmp_path / "c.json").write_text("{not json")
  with pytest.raises(ValueError, match="c.json"):
    oracle.Oracle({"c": str(tmp_path / "c.png")}).describe("c")
  with pytest.raises(FileNotFoundError, match="d.json"):
    oracle.Oracle({"d": str(tmp_path / "d.png")}).describe("d")
