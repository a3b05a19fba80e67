"""Describe-then-decide P(yes) (generate.decide) on a tiny random model: P(yes) read after the first "Answer:" of
the decoded text equals a full forward of prompt + prefix; items without the marker get 0 and are flagged; fixed
batch shapes; the Calibrator's holistic and per-intent verification go through it."""

import json

import numpy as np
import pytest
from flax import nnx

from configs import base
from recall_jax.data import pipeline
from recall_jax.generate import sft
from recall_jax.data.image import ImageBuckets
from recall_jax.generate import GenerateOutput, Sampler, decide
from recall_jax.models import qwen2_5_vl
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import build_tiny_tokenizer
from recall_jax.stages import calibrate

LENGTHS = (128, 256)
BATCH = 2
ENCODE = pipeline.EncodeConfig(image_buckets=ImageBuckets.from_config(56), query_lengths=(128,),
                               target_lengths=(128,))


class ScriptedSampler(Sampler):
  """The real model scores; generation is scripted: each row "writes" the text of the first script key its prompt
  contains. Records the shapes of every call."""

  def __init__(self, model, tokenizer, script, **kw):
    super().__init__(model, tokenizer, **kw)
    self.script, self.shapes = script, []

  def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *, max_new_tokens,
               **kw):
    self.shapes.append(("generate", np.shape(input_ids)))
    rows = []
    for ids, mask in zip(np.asarray(input_ids), np.asarray(attention_mask)):
      prompt = self.tokenizer.decode(ids[mask.astype(bool)].tolist())
      text = next(v for k, v in self.script.items() if k in prompt)
      rows.append(self.tokenizer.encode(text, add_special_tokens=False)[:max_new_tokens - 1] + [self.eos_ids[0]])
    tokens = np.full((len(rows), max_new_tokens), self.pad_id, np.int32)
    for k, r in enumerate(rows):
      tokens[k, :len(r)] = r
    return GenerateOutput(tokens=tokens, log_probs=np.zeros(tokens.shape, np.float32),
                          lengths=np.asarray([len(r) for r in rows], np.int32))

  def score_candidates(self, input_ids, *args, **kw):
    self.shapes.append(("score", np.shape(input_ids)))
    return super().score_candidates(input_ids, *args, **kw)


@pytest.fixture(scope="module")
def setup(fashioniq_train):
  _, images = fashioniq_train
  model = qwen2_5_vl.Qwen25VLModel(qwen2_5_vl.tiny_config(), rngs=nnx.Rngs(0))
  return model, build_tiny_tokenizer(), pipeline.FileImages(images), sorted(images)


def _p_yes_by_forward(model, tokenizer, load, prompt, images, words, lengths=LENGTHS):
  """Softmax over the words' first tokens at the last position of a full forward of `prompt`."""
  inputs = decide.build_inputs(tokenizer, [prompt], [images], load, ENCODE, lengths)
  ids = [tokenizer.encode(w, add_special_tokens=False)[0] for w in words]
  logits = np.asarray(model(**inputs).logits, np.float64)[0, -1, ids]
  return np.exp(logits[1]) / np.exp(logits).sum()


SCRIPT = {
    "Is it red?": "a blue shirt. Answer: no",
    "Is it blue?": "I cannot tell",  # never decides
    "Is it a dress?": "Picture 1: a dress. Answer: yes. Answer: no",  # the FIRST marker counts
}


def test_describe_reads_p_yes_after_the_first_marker(setup):
  model, tokenizer, load, names = setup
  questions = list(SCRIPT)
  prompts = [sft.question_prompt(q) for q in questions]
  images = [(names[k],) for k in range(len(prompts))]
  sampler = ScriptedSampler(model, tokenizer, SCRIPT)
  got = decide.yes_probability(sampler, tokenizer, prompts, images, load=load, encode_cfg=ENCODE, lengths=LENGTHS,
                               batch_size=BATCH, reasoning="describe", max_new_tokens=48)
  assert got.texts == tuple(SCRIPT.values())
  assert got.no_marker.tolist() == [False, True, False]
  assert got.p_yes[1] == 0.0
  for k, prefix in ((0, "a blue shirt. Answer:"), (2, "Picture 1: a dress. Answer:")):
    want = _p_yes_by_forward(model, tokenizer, load, prompts[k] + prefix, images[k], (" no", " yes"))
    np.testing.assert_allclose(got.p_yes[k], want, rtol=1e-5)
  # Fixed shapes: every call is a full batch (3 items in batches of 2; the 2 decided ones in one).
  assert [(kind, shape[0]) for kind, shape in sampler.shapes] == [("generate", 2), ("generate", 2), ("score", 2)]

  direct = decide.yes_probability(sampler, tokenizer, prompts, images, load=load, encode_cfg=ENCODE,
                                  lengths=LENGTHS, batch_size=BATCH, reasoning="direct")
  assert direct.texts == (None,) * 3 and not direct.no_marker.any()
  for k in range(3):
    want = _p_yes_by_forward(model, tokenizer, load, prompts[k], images[k], ("no", "yes"))
    np.testing.assert_allclose(direct.p_yes[k], want, rtol=1e-5)


def test_answer_words_take_their_space_after_the_marker():
  tokenizer = build_tiny_tokenizer()
  first = lambda w: tokenizer.encode(w, add_special_tokens=False)[0]  # noqa: E731
  assert decide.answer_token_ids(tokenizer, ("no", "yes"), "describe") == [first(" no"), first(" yes")]
  assert decide.answer_token_ids(tokenizer, ("no", "yes")) == [first("no"), first("yes")]
  assert first(" yes") != first("yes")
  with pytest.raises(ValueError, match="calibrate.answer_words"):
    decide.answer_token_ids(tokenizer, ("no", " no"), "describe")
  with pytest.raises(ValueError, match="reasoning"):
    decide.answer_token_ids(tokenizer, ("no", "yes"), "think")


def test_prefix_beyond_the_largest_bucket_names_the_config(setup):
  model, tokenizer, load, names = setup
  sampler = ScriptedSampler(model, tokenizer, {"Is it": "x" * 300 + ". Answer: yes"})
  with pytest.raises(ValueError, match="calibrate.prompt_lengths"):
    decide.yes_probability(sampler, tokenizer, [sft.question_prompt("Is it red?")], [(names[0],)], load=load,
                           encode_cfg=ENCODE, lengths=LENGTHS, batch_size=BATCH, reasoning="describe",
                           max_new_tokens=400)


def test_calibrator_verifies_holistic_and_per_intent_by_describing(setup):
  model, tokenizer, load, names = setup
  ccfg = base.get_config().calibrate
  ccfg.verify_reasoning = "describe"
  ccfg.decomposed_verification = True
  ccfg.batch_size = BATCH
  ccfg.prompt_lengths = (768, 1024)
  script = {"is red and long": "Picture 1: a. Picture 2: b. Answer: yes", "has dots": "no idea",
            "is long": "Picture 2 is long. Answer: no"}
  sampler = ScriptedSampler(model, tokenizer, script, cache_buckets=ccfg.prompt_lengths)
  calibrator = calibrate.Calibrator(sampler, tokenizer, ccfg, ENCODE, load)
  assert calibrator.answer_ids == decide.answer_token_ids(tokenizer, ("no", "yes"), "describe")
  items = [(names[0], names[1], "is red and long"), (names[2], names[3], "has dots")]
  final, holistic, per_statement, notes = calibrator.verify(items, [["is long"], []])
  assert notes[0] == {"verify_text": script["is red and long"], "verify_statement_texts": [script["is long"]],
                      "verify_no_marker": False}
  assert notes[1] == {"verify_text": "no idea", "verify_statement_texts": [], "verify_no_marker": True}
  assert holistic[1] == final[1] == 0.0 and 0.0 < holistic[0] < 1.0 and 0.0 < per_statement[0][0] < 1.0
  assert final[0] == min(holistic[0], per_statement[0][0])
  ccfg.verify_reasoning = "think"
  with pytest.raises(ValueError, match="calibrate.verify_reasoning"):
    calibrate.Calibrator(sampler, tokenizer, ccfg, ENCODE, load)


def test_calibrate_batch_records_what_f_wrote(setup):
  """Stage 3's sample records and statistics carry the description F verified by, and its missing markers."""
  model, tokenizer, load, names = setup
  ccfg = base.get_config().calibrate
  ccfg.verify_reasoning, ccfg.batch_size, ccfg.prompt_lengths, ccfg.max_new_tokens = "describe", BATCH, (1024,), 64
  script = {'text: "is blue"': json.dumps({"segments": [{"original": "blue", "new": "red"}]}),
            'text: "has dots"': json.dumps({"segments": [{"original": "dots", "new": "stripes"}]}),
            'Instruction: "is red"': "Picture 2: a red dress. Answer: yes", 'Instruction: "has stripes"': "hmm"}
  sampler = ScriptedSampler(model, tokenizer, script, cache_buckets=ccfg.prompt_lengths)
  calibrator = calibrate.Calibrator(sampler, tokenizer, ccfg, ENCODE, load)
  records = [{"id": f"r{k}", "qid": f"q{k}", "dataset": "fashioniq", "split": "train", "category": "dress",
              "reference": names[2 * k], "instance": names[2 * k + 1], "group": f"g{k}", "text": text,
              "captions": [text], "targets": [names[5]], "instance_rank": 1, "gt_rank": 2,
              "instance_similarity": 0.5, "gt_similarity": 0.4} for k, text in enumerate(["is blue", "has dots"])]
  samples = calibrate.calibrate_batch(calibrator, records, None, None)
  assert [s["text"] for s in samples] == ["is red", "has stripes"]
  assert [s["verify_text"] for s in samples] == [script['Instruction: "is red"'], "hmm"]
  assert [s["verify_no_marker"] for s in samples] == [False, True]
  assert samples[1]["p_yes"] == 0.0 and 0.0 < samples[0]["p_yes"] < 1.0
  assert calibrate.statistics(samples, 2)["verify_no_marker"] == 1


def test_two_turn_verification_decides_the_conversation(setup):
  """calibrate.verify_turns = 2: F answers the first turn (Picture 1 + text) once per distinct (reference, text),
  the second turn continues that conversation with Picture 2, and P(yes) equals a forward of the whole
  conversation + F's second reading through its marker."""
  model, tokenizer, load, names = setup
  ccfg = base.get_config().calibrate
  ccfg.verify_reasoning, ccfg.verify_turns, ccfg.batch_size, ccfg.prompt_lengths = "describe", 2, BATCH, (768, 1024)
  script = {"slots A": "Picture 2: x. Check: all same. Answer: yes", "slots B": "no idea",
            'Instruction: "is red"': "Picture 1: p. Asked: slots A",
            'Instruction: "has dots"': "Picture 1: q. Asked: slots B"}
  sampler = ScriptedSampler(model, tokenizer, script, cache_buckets=ccfg.prompt_lengths)
  calibrator = calibrate.Calibrator(sampler, tokenizer, ccfg, ENCODE, load)
  items = [(names[0], names[1], "is red"), (names[0], names[2], "is red"), (names[3], names[4], "has dots")]
  d = calibrator.decide_holistic(items)
  generated = [s for s in sampler.shapes if s[0] == "generate"]
  assert len(generated) == 1 + 2  # two distinct first turns (one batch), three second turns (two batches)
  assert d.texts[0] == d.texts[1] == "Picture 1: p. Asked: slots A\nPicture 2: x. Check: all same. Answer: yes"
  assert d.texts[2] == "Picture 1: q. Asked: slots B\nno idea" and list(d.no_marker) == [False, False, True]
  turns = calibrate.prompt_files.VerifyTurns.load(ccfg.prompt_dir)
  conversation = turns.second("is red", "Picture 1: p. Asked: slots A") + "Picture 2: x. Check: all same. Answer:"
  for k in (0, 1):
    expected = _p_yes_by_forward(model, tokenizer, load, conversation, items[k][:2], (" no", " yes"),
                                 ccfg.prompt_lengths)
    np.testing.assert_allclose(d.p_yes[k], expected, rtol=1e-4)
  assert d.p_yes[0] != d.p_yes[1] and d.p_yes[2] == 0.0  # Picture 2 is read; no marker decides nothing
  ccfg.verify_reasoning = "direct"
  with pytest.raises(ValueError, match="calibrate.verify_turns"):
    calibrate.Calibrator(sampler, tokenizer, ccfg, ENCODE, load)
