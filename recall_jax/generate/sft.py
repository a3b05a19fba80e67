"""Supervised fine-tuning (generative) data from the synthetic world: teach the foundation model its oracle.

Four tasks, all built from the training split's scene graphs (`Oracle`):
  caption  Picture = an image, "Describe the garment."                       -> oracle.describe(image)
  vqa      an image + templated yes/no questions (`vqa_pairs` true/false pairs per image, on distinct attributes)
           -> "yes" / "no"
  rewrite  Stage 3's rewrite prompt (the calibrate stage's template files, in SFTConfig.prompt_mode): Picture 1 =
           the reference, Picture 2 = an informative-instance stand-in (a train image of the same category nearest
           to the target for which the original text is false), the original text
           -> minimal_json: {"segments": [{"original": <span>, "new": <span>}]} rebuilding the oracle's edit
              reference -> instance (of its paraphrases, the one closest to the original text);
           -> staged_cot: {"captions": {"picture_1": ..., "picture_2": ...}, "intents": [], "new_text": <the
              canonical edit reference -> instance>} (`canonical_edit`: one descriptive clause per changed
              attribute, in a fixed order). The tiny F is taught the captions and the new text, not the intent
              decomposition (an empty list, which the parser accepts): a text it can write from the two captions
              without copying spans, which a tiny model learns slowly.
  verify   Stage 3's verification prompt over (reference, candidate, text)   -> "yes" / "no" by oracle.judge,
           balanced: (target, original) yes, (instance, original) no, (instance, rewrite) yes, (target, rewrite) no;
           in staged_cot mode also (instance, canonical edit) yes, (target, canonical edit) no.
           With verify_turns = 2 (describe reasoning) a verification is a conversation of two turns: task
           "verify_ask" (Picture 1 + the text -> Picture 1's caption and the asked garment's slots), and "verify"
           (that exchange, then Picture 2 -> its caption, the checks with both values, the decision);
           verify_turn_answers.

Reasoning (SFTConfig.reasoning): "direct" answers as above. "describe" has the model read the pictures before it
decides, in text: a yes/no answer becomes "<what the picture shows>. Answer: yes" (the asked attribute's value for a
question; for a verification Picture 1's caption, after ASKED_MARKER the caption of the garment the text asks for
(the reference with the text's changes applied), Picture 2's caption, then after CHECK_MARKER one "<attribute>
same|differs" per attribute of the asked garment against Picture 2, so that the decision is whether every check says
"same"), and a rewrite's JSON starts with a "visual_summary" holding both captions. A tiny model learns to read an
image into words quickly (captioning is a direct map) but not the image-question conjunction of a bare yes/no (it
first learns to ignore the image; shared environment notes); once the facts are words, the decision is a comparison
of words. The per-attribute checks make that comparison local. A text-only probe at the demo's model size
(`probes/verify_reading.py`: the captions given as text, 80% of the train queries to train, 20% to measure, 600
steps of 32) decided from the oracle's readings at 1.00 (every P(yes) on the right side of 0.95) after 200 steps,
where a reading that compared two change lists ("Change: <picture 1 -> 2>. Asked: <the text's change>") reached 0.86
and 0.55 at 0.95 after 600; writing its own reading, it agreed with the oracle on 0.71 of the held-out items. Stage
3 then decodes the description and reads P(yes) after `ANSWER_MARKER` (calibrate.verify_reasoning).

An example is a chat prompt ending with the assistant header, followed by the answer and <|im_end|>. Prompt and
answer are tokenised separately (so the answer's tokens are those the model generates after the header) and the
labels are the answer tokens and <|im_end|> only; every other label is IGNORE. Batches hold one task each (one image
count per batch: fixed vision shapes), are padded on the right to the smallest length bucket that fits, and their
order is a pure function of (seed, epoch): a `grain.MapDataset` whose element i is batch i of the run.

Batch arrays (B = batch size, k = images per example, P = patches of the image bucket, L = a length bucket):
  input_ids int32 (B, L), attention_mask int32 (B, L), labels int32 (B, L) (IGNORE outside answers),
  loss_weights float32 (B, L) (1 on answer tokens, SFTConfig.decision_weight on a yes/no decision token, 0 elsewhere),
  pixel_values float32 (B, k, P, D), image_grid_thw int64 (B, k, 3), valid bool (B,) (padding slots repeat an
  example of the batch and have no labels), example_index int32 (B,) (-1 on padding).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, Optional, Sequence

import grain
import numpy as np

from recall_jax.data import pipeline, prompts
from recall_jax.data.records import DataError, Query
from recall_jax.data.synthetic import language
from recall_jax.data.synthetic.attributes import ATTRIBUTES, CATEGORIES, VALUES
from recall_jax.data.synthetic import oracle as oracle_lib
from recall_jax.data.synthetic.oracle import Oracle
from recall_jax.generate import parse, prompt_files

IGNORE = -100
TASKS = ("caption", "vqa", "rewrite", "verify")
VERIFY_ASK = "verify_ask"  # a two-turn verification's first turn (SFTConfig.verify_turns = 2): its own batches
EXAMPLE_TASKS = TASKS + (VERIFY_ASK,)
VERIFY_TURNS = (1, 2)
DECISION_TASKS = ("vqa", "verify")  # answers that end in a yes/no decision token
REASONING = ("direct", "describe")
ANSWER_MARKER = "Answer:"  # "describe" reasoning: the yes/no word follows it
ASKED_MARKER = "Asked:"  # a describe verification: the caption of the garment the text asks for follows it
CHECK_MARKER = "Check:"  # ... then "<attribute> same|differs" per CHECKED attribute, against Picture 2
CHECKED = ("category",) + ATTRIBUTES
SAME, DIFFERS = "same", "differs"
VERSUS = "vs"  # a two-turn check: "<attribute> <asked value> vs <Picture 2's value> same|differs"
CAPTION_INSTRUCTION = "Describe the garment."
ANSWER_END = prompts.IM_END
EDIT_VARIANTS = 16  # paraphrases of each oracle edit tried for the most minimal rewrite


@dataclasses.dataclass(frozen=True)
class Example:
  """One generative example: `prompt` (chat format, image pads unexpanded, ends with the assistant header) with
  `images` in prompt order, the `answer` the model should write after it, and its `source` (the image name, or the
  query id of rewrite / verify examples)."""

  task: str
  images: tuple[str, ...]
  prompt: str
  answer: str
  source: str


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """tasks: which of TASKS to build; lengths: token length buckets; prompt_dir: the calibrate stage's template
  directory ("" = packaged), so training and use share prompts; caption_join: how a query's captions become the
  original text (as the mine stage joins them)."""

  lengths: tuple[int, ...]
  batch_size: int
  tasks: tuple[str, ...] = TASKS
  prompt_dir: str = ""
  caption_join: str = "and"
  reasoning: str = "direct"
  vqa_pairs: int = 1
  prompt_mode: str = "minimal_json"
  repeats: tuple[tuple[str, int], ...] = ()  # (task, k): each example of the task k times per epoch
  decision_weight: float = 1.0  # loss weight of a yes/no answer's decision token (DECISION_TASKS); others weigh 1
  verify_turns: int = 1  # 2: verification as two turns (verify_turn_answers), Picture 2 shown after the asked slots

  def __post_init__(self):
    if self.reasoning not in REASONING:
      raise ValueError(f"SFT reasoning must be one of {REASONING}, got {self.reasoning!r} (config teach.reasoning)")
    if self.prompt_mode not in parse.MODES:
      raise ValueError(f"SFT prompt_mode must be one of {parse.MODES}, got {self.prompt_mode!r} "
                       f"(config calibrate.prompt_mode)")
    bad = [(t, k) for t, k in self.repeats if t not in EXAMPLE_TASKS or int(k) < 1]
    if bad:
      raise ValueError(f"SFT repeats must be (task, k >= 1) pairs over {EXAMPLE_TASKS}, got {bad} "
                       "(config teach.repeats)")
    if self.verify_turns not in VERIFY_TURNS:
      raise ValueError(f"SFT verify_turns must be one of {VERIFY_TURNS}, got {self.verify_turns} "
                       "(config calibrate.verify_turns)")
    if self.verify_turns == 2 and self.reasoning != "describe":
      raise ValueError("a two-turn verification (config calibrate.verify_turns = 2) is a reading, which needs "
                       f"config teach.reasoning = 'describe', got {self.reasoning!r}")
    if not self.decision_weight > 0:
      raise ValueError(f"SFT decision_weight must be > 0, got {self.decision_weight} (config teach.decision_weight)")
    if not 1 <= self.vqa_pairs <= 6:
      raise ValueError(f"SFT vqa_pairs must be in [1, 6] (one per attribute), got {self.vqa_pairs} "
                       f"(config teach.vqa_pairs)")
    unknown = set(self.tasks) - set(TASKS)
    if unknown or not self.tasks:
      raise ValueError(f"SFT tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
    if not self.lengths or min(self.lengths) < 1:
      raise ValueError(f"SFT length buckets must be positive, got {self.lengths}")
    if self.batch_size < 1:
      raise ValueError(f"SFT batch_size must be >= 1, got {self.batch_size}")


# ------------------------------------------------------------------------------------------------ prompts


def caption_prompt() -> str:
  return prompts.chat_prompt(prompts.DEFAULT_SYSTEM_PROMPT, prompts.picture_content(1, CAPTION_INSTRUCTION),
                             add_vision_id=True)


def question_prompt(question: str) -> str:
  return prompts.chat_prompt(prompts.DEFAULT_SYSTEM_PROMPT, prompts.picture_content(1, question), add_vision_id=True)


def minimal_segments(original: str, new: str) -> list[dict[str, str]]:
  """The shortest word-level segment list turning `original` into `new` under `parse.rebuild_from_spans`: the
  common leading and trailing words are kept, the middle replaced (one segment; the whole text when the middle's
  span would be found earlier in the text)."""
  a, b = original.split(" "), new.split(" ")
  head = 0
  while head < min(len(a), len(b)) and a[head] == b[head]:
    head += 1
  tail = 0
  while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
    tail += 1
  old_span = " ".join(a[head:len(a) - tail])
  new_span = " ".join(b[head:len(b) - tail])
  segments = [{"original": old_span, "new": new_span}]
  if not old_span or parse.rebuild_from_spans(original, segments)[0] != parse.clean_text(new):
    segments = [{"original": original, "new": new}]
  return segments


def rewrite_answer(original: str, new: str, summary: Optional[str] = None) -> str:
  """The minimal-JSON answer; with a summary (describe reasoning) it comes first, as the template asks."""
  head = {} if summary is None else {"visual_summary": summary}
  return json.dumps({**head, "segments": minimal_segments(original, new)})


def canonical_edit(reference, target) -> str:
  """The edit reference -> target (Garments) in one fixed wording: a descriptive clause per changed attribute, in
  ATTRIBUTES order ("is blue, has long sleeves and has a v-neck")."""
  parts = [language.absolute_clause(a, target.get(a)) for a in reference.diff(target)]
  if not parts:
    raise ValueError(f"reference and target are the same garment {reference}")
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def staged_answer(captions: tuple[str, str], new_text: str) -> str:
  return json.dumps({"captions": {"picture_1": captions[0], "picture_2": captions[1]}, "intents": [],
                     "new_text": new_text})


def decision_answer(description: str, yes: bool) -> str:
  """A describe-reasoning yes/no answer: what the picture(s) show, then the decision after ANSWER_MARKER."""
  return f"{description}. {ANSWER_MARKER} {'yes' if yes else 'no'}"


def two_picture_summary(oracle: Oracle, first: str, second: str) -> str:
  return f"Picture 1: {oracle.describe(first)}. Picture 2: {oracle.describe(second)}"


def asked_garment(oracle: Oracle, reference: str, text: str):
  """The garment `text` asks for from the reference (oracle_lib.implied), or None when it pins down no single garment
  of the reference's category (then no verification example is built on it)."""
  wanted = oracle_lib.implied(oracle.garment(reference), text)
  return None if wanted is None or wanted.category != oracle.garment(reference).category else wanted


def attribute_checks(asked, candidate) -> str:
  """"category same, colour differs, ...": each CHECKED attribute of the asked garment against the candidate's."""
  return ", ".join(f"{a} {SAME if asked.get(a) == candidate.get(a) else DIFFERS}" for a in CHECKED)


def attribute_comparisons(asked, candidate) -> str:
  """"category dress vs dress same, colour red vs blue differs, ...": attribute_checks with both values written
  first, so that each same/differs compares the two words just before it. Without them (two turns, demo F) F said
  "same" for 0.97 of the differing sleeves and lengths of Stage 3's items while it read the values themselves right:
  it had to look both up across the conversation and compare them in one token."""
  return ", ".join(f"{a} {asked.get(a)} {VERSUS} {candidate.get(a)} "
                   f"{SAME if asked.get(a) == candidate.get(a) else DIFFERS}" for a in CHECKED)


def verify_summary(oracle: Oracle, reference: str, candidate: str, text: str) -> Optional[str]:
  """A describe-reasoning verification's reading: Picture 1's caption, the caption of the garment the text asks for,
  Picture 2's caption, then the per-attribute checks of the asked garment against Picture 2. The asked caption comes
  before Picture 2's, so that it is worked out from Picture 1 and the text: written after it, a tiny model copies
  Picture 2's caption (half of the items ask for exactly Picture 2) and says yes. oracle.judge holds exactly when
  every check is "same" (build_examples checks it). None as asked_garment."""
  asked = asked_garment(oracle, reference, text)
  if asked is None:
    return None
  return (f"Picture 1: {oracle.describe(reference)}. {ASKED_MARKER} {language.describe_garment(asked)}. "
          f"Picture 2: {oracle.describe(candidate)}. {CHECK_MARKER} {attribute_checks(asked, oracle.garment(candidate))}")


def asked_slots(asked) -> str:
  """"colour red, pattern dots, sleeves long, length knee, neckline v": the asked garment's ATTRIBUTES in a fixed
  order (its category is the reference's, asked_garment)."""
  return ", ".join(f"{a} {asked.get(a)}" for a in ATTRIBUTES)


def verify_turn_answers(oracle: Oracle, reference: str, candidate: str, text: str) -> Optional[tuple[str, str]]:
  """A two-turn verification's readings (SFTConfig.verify_turns = 2). Turn 1 sees Picture 1 and the text:
  "Picture 1: <caption>. Asked: <asked_slots>". Turn 2 then sees Picture 2: "Picture 2: <caption>. Check:
  <attribute_comparisons>", and decision_answer appends the decision. Picture 2 comes after the asked garment is
  written, so that it cannot be copied into it (in one turn a tiny F wrote Picture 2's caption as the asked one and
  said yes to everything); slots rather than a caption make each asked value a local choice (the text's value or
  Picture 1's). The text-only probe at the demo's size (probes/verify_reading.py, format S) agreed with the oracle
  on 0.94 of held-out train items writing its own reading, where the asked caption (format G) reached 0.71.
  None as asked_garment."""
  asked = asked_garment(oracle, reference, text)
  if asked is None:
    return None
  checks = attribute_comparisons(asked, oracle.garment(candidate))
  return (f"Picture 1: {oracle.describe(reference)}. {ASKED_MARKER} {asked_slots(asked)}",
          f"Picture 2: {oracle.describe(candidate)}. {CHECK_MARKER} {checks}")


def value_phrase(attr: str, value: str) -> str:
  """How a question names `value` of `attr` ("Is it <phrase>?" / "Does it have <phrase>?")."""
  return re.sub(r"^(?:Is it|Does it have) (.*)\?$", r"\1", language.question(attr, value))


# ----------------------------------------------------------------------------------------------- examples


def _vqa_examples(oracle: Oracle, name: str, rng: np.random.Generator, pairs: int = 1,
                  reasoning: str = "direct") -> list[Example]:
  """`pairs` true and false templated questions about the image, each pair on its own attribute (drawn)."""
  g = oracle.garment(name)
  attrs = ("category",) + ATTRIBUTES
  out = []
  for attr in [attrs[i] for i in rng.permutation(len(attrs))[:pairs]]:
    values = CATEGORIES if attr == "category" else VALUES[attr]
    true_value = g.get(attr)
    false_value = str(rng.choice([v for v in values if v != true_value]))
    for value, yes in ((true_value, True), (false_value, False)):
      question = language.question(attr, value)
      if oracle.answer(name, question) != yes:
        raise DataError(f"oracle disagrees with the templated question {question!r} on image {name!r}")
      answer = decision_answer(value_phrase(attr, true_value), yes) if reasoning == "describe" else (
          "yes" if yes else "no")
      out.append(Example("vqa", (name,), question_prompt(question), answer, name))
  return out


def informative_instance(oracle: Oracle, query: Query, text: str, pool: Sequence[str]) -> Optional[str]:
  """A stand-in for a mined informative instance: among the pool's images of the reference's category, other
  than the reference and the targets, for which `text` is false, the one nearest to the target (fewest differing
  attributes; ties by name). None when there is none."""
  ref = oracle.garment(query.reference)
  target = oracle.garment(query.target)
  excluded = {query.reference, *query.targets}
  same = [n for n in pool if n not in excluded and oracle.garment(n).category == ref.category]
  for name in sorted(same, key=lambda n: (len(target.diff(oracle.garment(n))), n)):
    if not oracle.judge(query.reference, text, name):
      return name
  return None


def closest_edit(oracle: Oracle, reference: str, instance: str, original: str, variants: int = EDIT_VARIANTS) -> str:
  """Among the oracle's paraphrases of the edit reference -> instance, the one whose segments against `original`
  are shortest (the most minimal rewrite; ties by variant)."""
  texts = [parse.clean_text(oracle.edit(reference, instance, variant=v)) for v in range(variants)]
  return min(texts, key=lambda t: len(rewrite_answer(original, t)))


def build_examples(queries: Sequence[Query], images: Mapping[str, str], cfg: SFTConfig, seed: int) -> list[Example]:
  """Every example of the configured tasks over the training queries; `images` maps names to files with their
  scene graphs beside them (CIRSplit.images). Deterministic in (queries, seed)."""
  oracle = Oracle(images)
  rng = np.random.default_rng(seed)
  names = sorted({n for q in queries for n in (q.reference, *q.targets)})
  out: list[Example] = []
  if "caption" in cfg.tasks:
    out += [Example("caption", (n,), caption_prompt(), oracle.describe(n), n) for n in names]
  if "vqa" in cfg.tasks:
    for n in names:
      out += _vqa_examples(oracle, n, rng, cfg.vqa_pairs, cfg.reasoning)
  if {"rewrite", "verify"} & set(cfg.tasks):
    rewrite_t = prompt_files.load_template(prompt_files.REWRITE_TEMPLATES[cfg.prompt_mode], cfg.prompt_dir)
    verify_t = prompt_files.load_template(prompt_files.VERIFY_TEMPLATE, cfg.prompt_dir)
    turns = prompt_files.VerifyTurns.load(cfg.prompt_dir) if cfg.verify_turns == 2 else None
    for k, q in enumerate(queries):
      if q.target is None:
        raise DataError(f"training query {q.qid!r} ({q.source}) has no target")
      text = prompts.join_captions(q.captions, cfg.caption_join)
      instance = informative_instance(oracle, q, text, names)
      if instance is None:
        continue
      new = closest_edit(oracle, q.reference, instance, text)
      if not oracle.judge(q.reference, new, instance):
        raise DataError(f"oracle.edit({q.reference!r}, {instance!r}) = {new!r} is judged false by the oracle")
      describe = cfg.reasoning == "describe"
      if "rewrite" in cfg.tasks:
        if cfg.prompt_mode == "staged_cot":
          canonical = canonical_edit(oracle.garment(q.reference), oracle.garment(instance))
          if not oracle.judge(q.reference, canonical, instance):
            raise DataError(f"canonical edit {canonical!r} of {q.reference!r} -> {instance!r} is judged false")
          answer = staged_answer((oracle.describe(q.reference), oracle.describe(instance)), canonical)
        else:
          summary = two_picture_summary(oracle, q.reference, instance) if describe else None
          answer = rewrite_answer(text, new, summary)
        out += [Example("rewrite", (q.reference, instance), prompt_files.two_picture_prompt(rewrite_t, text), answer, q.qid)]
      if "verify" in cfg.tasks:
        items = [(q.target, text), (instance, text), (instance, new), (q.target, new)]
        if cfg.prompt_mode == "staged_cot":  # the canonical wording F's staged rewrites are in
          canonical = canonical_edit(oracle.garment(q.reference), oracle.garment(instance))
          items += [(instance, canonical), (q.target, canonical)]
        asked_seen = set()
        for candidate, t in items:
          yes = oracle.judge(q.reference, t, candidate)
          if turns is not None:
            readings = verify_turn_answers(oracle, q.reference, candidate, t)
            if readings is None:
              continue
            if (DIFFERS not in readings[1]) != yes:
              raise DataError(f"the verification reading of {q.qid!r} ({readings!r}) disagrees with oracle.judge")
            if t not in asked_seen:  # the first turn depends on (reference, text) only
              asked_seen.add(t)
              out.append(Example(VERIFY_ASK, (q.reference,), turns.first(t), readings[0], q.qid))
            out.append(Example("verify", (q.reference, candidate), turns.second(t, readings[0]),
                               decision_answer(readings[1], yes), q.qid))
            continue
          if describe:
            summary = verify_summary(oracle, q.reference, candidate, t)
            if summary is None:
              continue
            checks = summary.split(f". {CHECK_MARKER} ")[1]
            if (DIFFERS not in checks) != yes:
              raise DataError(f"the verification reading of {q.qid!r} ({summary!r}) disagrees with oracle.judge")
          answer = decision_answer(summary, yes) if describe else "yes" if yes else "no"
          out.append(Example("verify", (q.reference, candidate), prompt_files.two_picture_prompt(verify_t, t), answer, q.qid))
  if not out:
    raise DataError(f"no SFT examples from {len(queries)} queries for tasks {cfg.tasks}")
  return out


# --------------------------------------------------------------------------------------------- tokenising


def tokenize_example(tokenizer: Any, example: Example, image_token_counts: Sequence[int]) -> tuple[list[int],
                                                                                                   list[int]]:
  """(ids, labels): prompt (image pads expanded) + answer + <|im_end|>; labels IGNORE except on answer + end."""
  prompt_ids = tokenizer(prompts.expand_image_pads(example.prompt, image_token_counts),
                         add_special_tokens=False)["input_ids"]
  answer_ids = tokenizer(example.answer + ANSWER_END, add_special_tokens=False)["input_ids"]
  return list(prompt_ids) + list(answer_ids), [IGNORE] * len(prompt_ids) + list(answer_ids)


class _BatchEncoder:
  """Batch plan entry -> batch arrays; picklable (Grain workers)."""

  def __init__(self, examples: Sequence[Example], load: pipeline.ImageLoader, tokenizer: Any,
               encode_cfg: pipeline.EncodeConfig, lengths: Sequence[int], origin: Sequence[int],
               decision_weight: float = 1.0):
    self.examples = tuple(examples)
    self.decision_weight = float(decision_weight)
    self.origin = np.asarray(origin, np.int32)  # plan index -> index into the caller's examples
    self.load = load
    self.tokenizer = tokenizer
    self.encode_cfg = encode_cfg
    self.lengths = tuple(sorted(lengths))

  def _decision_offset(self, answer: str) -> int:
    """Index, among the answer's tokens, of the first token of its final yes / no word: the token Stage 3 scores
    (generate.decide)."""
    word = answer.rsplit(" ", 1)[-1]
    head = answer[:len(answer) - len(word)].rstrip(" ")  # the space belongs to the word's token
    head_ids = self.tokenizer(head, add_special_tokens=False)["input_ids"] if head else []
    ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if word not in ("yes", "no") or list(ids[:len(head_ids)]) != list(head_ids):
      raise ValueError(f"SFT answer {answer!r} does not end in a yes / no word tokenised on its own")
    return len(head_ids)

  def __call__(self, slots: Mapping[str, Any]) -> dict[str, np.ndarray]:
    index = np.asarray(slots["index"])
    valid = index >= 0
    fill = int(index[valid][0])
    chosen = [self.examples[int(i) if i >= 0 else fill] for i in index]
    per_example = {len(e.images) for e in chosen}
    if len(per_example) != 1:
      raise ValueError(f"an SFT batch must hold one image count per example, got {sorted(per_example)}")
    names = [n for e in chosen for n in e.images]
    distinct = list(dict.fromkeys(names))
    pixels, grids = pipeline.encode_images([self.load(n) for n in distinct], self.encode_cfg)
    rows = [distinct.index(n) for n in names]
    k = per_example.pop()
    merge = self.encode_cfg.merge_size ** 2
    tokens = [tokenize_example(self.tokenizer, e, [int(np.prod(grids[rows[j * k + i]])) // merge for i in range(k)])
              for j, e in enumerate(chosen)]
    longest = max(len(ids) for ids, _ in tokens)
    if longest > self.lengths[-1]:
      raise ValueError(f"an SFT example of task {chosen[0].task!r} has {longest} tokens, more than the largest length "
                       f"bucket {self.lengths[-1]} (config teach.lengths)")
    length = next(b for b in self.lengths if b >= longest)
    b = len(chosen)
    input_ids = np.full((b, length), self.tokenizer.pad_token_id, np.int32)
    attention_mask = np.zeros((b, length), np.int32)
    labels = np.full((b, length), IGNORE, np.int32)
    weights = np.zeros((b, length), np.float32)
    for j, (ids, lab) in enumerate(tokens):
      input_ids[j, :len(ids)] = ids
      attention_mask[j, :len(ids)] = 1
      if valid[j]:
        labels[j, :len(lab)] = lab
        answer = np.flatnonzero(np.asarray(lab) != IGNORE)
        weights[j, answer] = 1.0
        if chosen[j].task in DECISION_TASKS:
          weights[j, answer[0] + self._decision_offset(chosen[j].answer)] = self.decision_weight
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "loss_weights": weights,
        "pixel_values": pixels[rows].reshape(b, k, *pixels.shape[1:]),
        "image_grid_thw": grids[rows].reshape(b, k, 3),
        "valid": valid, "example_index": np.where(valid, self.origin[np.maximum(index, 0)], -1).astype(np.int32),
    }


class _TaskBatchPlan:
  """Epoch -> this process's part of that epoch's single-task batches, whose order and contents are drawn from
  (seed, epoch): every process draws the same global batches and keeps its own columns. A picklable plan_fn for
  pipeline.EpochBatches, which lays the epochs end to end."""

  def __init__(self, tasks: Sequence[str], batch_size: int, seed: int, process_index: int, process_count: int):
    self.by_task = [np.flatnonzero(np.asarray(tasks) == t) for t in dict.fromkeys(tasks)]
    self.batch_size = batch_size
    self.seed = seed
    local = pipeline.local_batch_size(batch_size, process_count)
    self.columns = slice(process_index * local, (process_index + 1) * local)

  def __call__(self, epoch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, epoch])
    batches = []
    for ix in self.by_task:
      order = rng.permutation(ix)
      padded = np.full(-(-len(order) // self.batch_size) * self.batch_size, -1, np.int64)
      padded[:len(order)] = order
      batches += list(padded.reshape(-1, self.batch_size))
    index = np.stack([batches[i] for i in rng.permutation(len(batches))])
    return {"index": index[:, self.columns]}


def sft_dataset(examples: Sequence[Example], *, load: pipeline.ImageLoader, tokenizer: Any,
                encode_cfg: pipeline.EncodeConfig, cfg: SFTConfig, seed: int,
                num_epochs: Optional[int] = None, process_index: Optional[int] = None,
                process_count: Optional[int] = None) -> grain.MapDataset:
  """This process's fixed-shape batches of `examples` (one task per batch; cfg.batch_size is the global batch),
  epochs end to end (forever when num_epochs is None)."""
  if not examples:
    raise ValueError("sft_dataset needs at least one example")
  repeats = dict(cfg.repeats)
  index = [i for i, e in enumerate(examples) for _ in range(int(repeats.get(e.task, 1)))]
  plan = _TaskBatchPlan([examples[i].task for i in index], cfg.batch_size, seed,
                        *pipeline.process_position(process_index, process_count))
  chosen = [examples[i] for i in index]
  return grain.MapDataset.source(pipeline.EpochBatches(plan, num_epochs)).map(_BatchEncoder(chosen, load, tokenizer, encode_cfg, cfg.lengths, index,
                                                         cfg.decision_weight))
