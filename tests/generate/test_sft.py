"""SFT data from the synthetic world: answers agree with the oracle, prompts are the calibrate stage's, labels cover
exactly the answer tokens, and batches are fixed-shape and a pure function of (seed, epoch)."""

import collections
import json

import numpy as np
import pytest

from recall_jax.data import pipeline, prompts
from recall_jax.generate import sft
from recall_jax.data.image import ImageBuckets
from recall_jax.data.synthetic import Oracle, language
from recall_jax.data.synthetic import oracle as oracle_lib
from recall_jax.generate import parse, prompt_files
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import build_tiny_tokenizer

LENGTHS = (128, 512, 1280)


@pytest.fixture(scope="module")
def examples(fashioniq_train):
  queries, images = fashioniq_train
  return sft.build_examples(queries, images, sft.SFTConfig(lengths=LENGTHS, batch_size=4), seed=0)


def _dataset(fashioniq_train, examples, seed=0, batch_size=4, **process):
  _, images = fashioniq_train
  enc = pipeline.EncodeConfig(image_buckets=ImageBuckets.square(56), query_lengths=(256,), target_lengths=(128,))
  return sft.sft_dataset(examples, load=pipeline.FileImages(images), tokenizer=build_tiny_tokenizer(),
                         encode_cfg=enc, cfg=sft.SFTConfig(lengths=LENGTHS, batch_size=batch_size), seed=seed,
                         **process)


def test_answers_agree_with_the_oracle(fashioniq_train, examples):
  queries, images = fashioniq_train
  oracle = Oracle(images)
  by_qid = {q.qid: q for q in queries}
  tasks = collections.Counter(e.task for e in examples)
  assert set(tasks) == set(sft.TASKS) and tasks["rewrite"] >= len(queries) // 2
  vqa = [e for e in examples if e.task == "vqa"]
  assert [e.answer for e in vqa].count("yes") == [e.answer for e in vqa].count("no") > 0
  for e in examples:
    if e.task == "caption":
      assert e.answer == oracle.describe(e.images[0])
    elif e.task == "vqa":
      question = e.prompt.split(prompts.IMAGE_PLACEHOLDER)[1].split(prompts.IM_END)[0]
      assert oracle.answer(e.images[0], question) == (e.answer == "yes")
    elif e.task == "rewrite":
      q = by_qid[e.source]
      original = prompts.join_captions(q.captions)
      reference, instance = e.images
      assert reference == q.reference and instance not in q.targets
      assert not oracle.judge(reference, original, instance)  # a real failure of the original text
      result = parse.parse_rewrite(e.answer, original, "minimal_json")
      assert result.reason == parse.OK, e.answer
      assert oracle.judge(reference, result.text, instance), (original, result.text)
    else:
      text = e.prompt.split('Instruction: "')[1].split('"\n')[0]
      assert oracle.judge(e.images[0], text, e.images[1]) == (e.answer == "yes")
  verify = [e.answer for e in examples if e.task == "verify"]
  assert verify.count("yes") == verify.count("no")


def test_prompts_are_the_calibrate_stage_prompts(fashioniq_train, examples):
  queries, _ = fashioniq_train
  rewrite_t = prompt_files.load_template(prompt_files.REWRITE_TEMPLATES["minimal_json"])
  verify_t = prompt_files.load_template(prompt_files.VERIFY_TEMPLATE)
  by_qid = {q.qid: q for q in queries}
  e = next(e for e in examples if e.task == "rewrite")
  assert e.prompt == prompt_files.two_picture_prompt(rewrite_t, prompts.join_captions(by_qid[e.source].captions))
  e = next(e for e in examples if e.task == "verify")
  assert e.prompt == prompt_files.two_picture_prompt(verify_t, prompts.join_captions(by_qid[e.source].captions))


def test_labels_are_exactly_the_answer_tokens(fashioniq_train, examples):
  ds = _dataset(fashioniq_train, examples)
  tokenizer = build_tiny_tokenizer()
  seen = 0
  for i in range(8):
    batch = ds[i]
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[1] in LENGTHS
    for row in range(len(batch["valid"])):
      labels, ids = batch["labels"][row], batch["input_ids"][row]
      if not batch["valid"][row]:
        assert np.all(labels == sft.IGNORE)
        continue
      e = examples[batch["example_index"][row]]
      trained = labels != sft.IGNORE
      assert np.array_equal(labels[trained], ids[trained])  # labels are the inputs (shifted in the loss)
      assert tokenizer.decode(labels[trained]) == e.answer + prompts.IM_END
      end = int(batch["attention_mask"][row].sum())
      assert trained[end - 1] and not trained[:end][:-len(labels[trained])].any()  # one span at the very end
      seen += 1
  assert seen > 8


def test_batches_are_deterministic_and_cover_every_example_each_epoch(fashioniq_train, examples):
  ds, again, other = _dataset(fashioniq_train, examples), _dataset(fashioniq_train, examples), _dataset(fashioniq_train, examples, seed=1)
  per_epoch = sum(-(-n // 4) for n in collections.Counter(e.task for e in examples).values())
  first = [ds[i]["example_index"] for i in range(per_epoch)]
  for i in (0, 3, per_epoch + 2):
    a, b = ds[i], again[i]
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  covered = np.concatenate(first)
  assert sorted(covered[covered >= 0].tolist()) == list(range(len(examples)))
  second = np.concatenate([ds[per_epoch + i]["example_index"] for i in range(per_epoch)])
  assert sorted(second[second >= 0].tolist()) == list(range(len(examples)))
  assert not np.array_equal(covered, second)
  assert not np.array_equal(covered, np.concatenate([other[i]["example_index"] for i in range(per_epoch)]))
  for i in range(per_epoch):  # one task (so one image count) per batch
    assert len({examples[j].task for j in first[i] if j >= 0}) == 1


def test_each_process_reads_its_columns_of_the_same_global_batches(fashioniq_train, examples):
  whole = _dataset(fashioniq_train, examples, process_index=0, process_count=1)
  parts = [_dataset(fashioniq_train, examples, process_index=p, process_count=2) for p in (0, 1)]
  for i in (0, 5, 40):
    halves = [part[i] for part in parts]
    assert all(h["example_index"].shape == (2,) for h in halves)
    np.testing.assert_array_equal(np.concatenate([h["example_index"] for h in halves]), whole[i]["example_index"])
    np.testing.assert_array_equal(np.concatenate([h["labels"] for h in halves]), whole[i]["labels"])
  with pytest.raises(ValueError, match="multiple of the process count"):
    _dataset(fashioniq_train, examples, batch_size=3, process_index=0, process_count=2)


def test_errors_name_the_config(fashioniq_train, examples):
  with pytest.raises(ValueError, match="tasks"):
    sft.SFTConfig(lengths=LENGTHS, batch_size=4, tasks=("caption", "poem"))
  _, images = fashioniq_train
  enc = pipeline.EncodeConfig(image_buckets=ImageBuckets.square(56), query_lengths=(256,), target_lengths=(128,))
  rewrites = [e for e in examples if e.task == "rewrite"]
  ds = sft.sft_dataset(rewrites, load=pipeline.FileImages(images), tokenizer=build_tiny_tokenizer(), encode_cfg=enc,
                       cfg=sft.SFTConfig(lengths=(512,), batch_size=2), seed=0)
  with pytest.raises(ValueError, match="teach.lengths"):
    ds[0]


def test_describe_reasoning_puts_the_facts_in_words_before_deciding(fashioniq_train):
  queries, images = fashioniq_train
  oracle = Oracle(images)
  cfg = sft.SFTConfig(lengths=LENGTHS, batch_size=4, reasoning="describe", vqa_pairs=3)
  examples = sft.build_examples(queries, images, cfg, seed=0)
  vqa = [e for e in examples if e.task == "vqa"]
  assert len(vqa) == 6 * len({e.source for e in vqa})  # three true/false pairs per image
  for e in vqa:
    question = e.prompt.split(prompts.IMAGE_PLACEHOLDER)[1].split(prompts.IM_END)[0]
    description, decision = e.answer.split(f". {sft.ANSWER_MARKER} ")
    assert decision == ("yes" if oracle.answer(e.images[0], question) else "no")
    assert oracle.answer(e.images[0], f"Is it {description}?" if not description.startswith("a ") or
                         description in ("a dress", "a shirt", "a top") else f"Does it have {description}?")
  asked = collections.defaultdict(set)
  for e in vqa:
    asked[e.source].add(e.prompt)
  assert all(len(p) == 6 for p in asked.values())  # distinct questions: attributes drawn without repetition
  for e in examples:
    if e.task == "verify":
      description, decision = e.answer.split(f". {sft.ANSWER_MARKER} ")
      text = e.prompt.split('Instruction: "')[1].split('"\n')[0]
      assert description == sft.verify_summary(oracle, *e.images, text)
      first, rest = description.split(f". {sft.ASKED_MARKER} ")
      asked, rest = rest.split(". Picture 2: ")
      second, checks = rest.split(f". {sft.CHECK_MARKER} ")
      assert (first, second) == (f"Picture 1: {oracle.describe(e.images[0])}", oracle.describe(e.images[1]))
      reference, candidate = (oracle.garment(n) for n in e.images)
      wanted = oracle_lib.implied(reference, text)
      assert asked == language.describe_garment(wanted)  # the garment the text asks for, as a caption
      assert oracle.judge(e.images[0], text, e.images[1]) == (wanted == candidate)
      assert checks == ", ".join(f"{a} {'same' if wanted.get(a) == candidate.get(a) else 'differs'}"
                                 for a in ("category", "colour", "pattern", "sleeves", "length", "neckline"))
      assert decision == ("yes" if oracle.judge(e.images[0], text, e.images[1]) else "no") == (
          "no" if "differs" in checks else "yes")  # the decision is whether every check says "same"
    if e.task == "rewrite":
      answer = json.loads(e.answer)
      assert list(answer) == ["visual_summary", "segments"]  # the summary is written first
      assert answer["visual_summary"] == sft.two_picture_summary(oracle, *e.images)
      original = prompts.join_captions({q.qid: q for q in queries}[e.source].captions)
      assert parse.parse_rewrite(e.answer, original, "minimal_json").reason == parse.OK
  with pytest.raises(ValueError, match="teach.reasoning"):
    sft.SFTConfig(lengths=LENGTHS, batch_size=4, reasoning="think")
  with pytest.raises(ValueError, match="teach.vqa_pairs"):
    sft.SFTConfig(lengths=LENGTHS, batch_size=4, vqa_pairs=7)


def test_decision_tokens_carry_the_decision_weight(fashioniq_train):
  queries, images = fashioniq_train
  tokenizer = build_tiny_tokenizer()
  enc = pipeline.EncodeConfig(image_buckets=ImageBuckets.square(56), query_lengths=(256,), target_lengths=(128,))
  cfg = sft.SFTConfig(lengths=(128, 2048), batch_size=4, tasks=("caption", "vqa", "verify"), reasoning="describe",
                      decision_weight=7.0)
  examples = sft.build_examples(queries[:4], images, cfg, seed=0)
  ds = sft.sft_dataset(examples, load=pipeline.FileImages(images), tokenizer=tokenizer, encode_cfg=enc, cfg=cfg,
                       seed=0, num_epochs=1)
  decision_ids = {tokenizer.encode(w, add_special_tokens=False)[0] for w in (" yes", " no")}  # as decide scores
  for i in range(len(ds)):
    batch = ds[i]
    for j in np.flatnonzero(batch["valid"]):
      labels, weights = batch["labels"][j], batch["loss_weights"][j]
      answer = np.flatnonzero(labels != sft.IGNORE)
      np.testing.assert_array_equal(weights[labels == sft.IGNORE], 0.0)
      heavy = np.flatnonzero(weights == 7.0)
      if examples[batch["example_index"][j]].task == "caption":
        assert heavy.size == 0 and np.all(weights[answer] == 1.0)
      else:  # exactly the first token of the final yes / no word
        assert heavy.size == 1 and labels[heavy[0]] in decision_ids
        word = examples[batch["example_index"][j]].answer.rsplit(" ", 1)[-1]
        assert labels[heavy[0]] == tokenizer.encode(" " + word, add_special_tokens=False)[0]
  with pytest.raises(ValueError, match="teach.decision_weight"):
    sft.SFTConfig(lengths=LENGTHS, batch_size=4, decision_weight=0.0)


def test_staged_rewrites_and_task_repeats(fashioniq_train):
  queries, images = fashioniq_train
  oracle = Oracle(images)
  cfg = sft.SFTConfig(lengths=(128, 2048), batch_size=4, tasks=("caption", "rewrite"), prompt_mode="staged_cot",
                      repeats=(("rewrite", 3),))
  examples = sft.build_examples(queries, images, cfg, seed=0)
  staged_t = prompt_files.load_template(prompt_files.REWRITE_TEMPLATES["staged_cot"])
  by_qid = {q.qid: q for q in queries}
  rewrites = [e for e in examples if e.task == "rewrite"]
  for e in rewrites:
    original = prompts.join_captions(by_qid[e.source].captions)
    assert e.prompt == prompt_files.two_picture_prompt(staged_t, original)
    result = parse.parse_rewrite(e.answer, original, "staged_cot")
    assert result.reason == parse.OK and oracle.judge(e.images[0], result.text, e.images[1]), e.answer
    assert json.loads(e.answer)["captions"] == {"picture_1": oracle.describe(e.images[0]),
                                                "picture_2": oracle.describe(e.images[1])}
  # Staged mode: verification also learns the canonical wording of the staged rewrites (yes on the instance only).
  vcfg = sft.SFTConfig(lengths=(128, 2048), batch_size=4, tasks=("rewrite", "verify"), prompt_mode="staged_cot")
  staged = sft.build_examples(queries, images, vcfg, seed=0)
  for e in (e for e in staged if e.task == "rewrite"):
    canonical = json.loads(e.answer)["new_text"]
    checks = {(v.images[1], v.answer.rsplit(" ", 1)[-1]) for v in staged
              if v.task == "verify" and v.source == e.source and f'"{canonical}"' in v.prompt}
    target = by_qid[e.source].target
    assert checks == {(e.images[1], "yes"), (target, "no")}, (canonical, checks)
  _, images = fashioniq_train
  enc = pipeline.EncodeConfig(image_buckets=ImageBuckets.square(56), query_lengths=(256,), target_lengths=(128,))
  ds = sft.sft_dataset(examples, load=pipeline.FileImages(images), tokenizer=build_tiny_tokenizer(),
                       encode_cfg=enc, cfg=cfg, seed=0)
  per_epoch = -(-len(rewrites) * 3 // 4) + -(-(len(examples) - len(rewrites)) // 4)
  seen = np.concatenate([ds[i]["example_index"] for i in range(per_epoch)])
  counts = collections.Counter(seen[seen >= 0].tolist())
  assert {examples[i].task for i, c in counts.items() if c == 3} == {"rewrite"}  # indices into `examples`
  assert {examples[i].task for i, c in counts.items() if c == 1} == {"caption"}
  assert sorted(counts) == list(range(len(examples)))
  with pytest.raises(ValueError, match="teach.repeats"):
    sft.SFTConfig(lengths=LENGTHS, batch_size=4, repeats=(("poem", 2),))


def test_two_turn_verification_shows_picture_2_after_the_asked_garment(fashioniq_train):
  """verify_turns = 2: a verify_ask example (Picture 1 + text -> Picture 1's caption and the asked slots) per
  (query, text), and verify examples that continue exactly that exchange with Picture 2, whose checks (both values,
  then same/differs) and decision agree with the oracle."""
  queries, images = fashioniq_train
  oracle = Oracle(images)
  cfg = sft.SFTConfig(lengths=LENGTHS, batch_size=4, reasoning="describe", verify_turns=2)
  examples = sft.build_examples(queries, images, cfg, seed=0)
  asks = {(e.source, e.prompt): e for e in examples if e.task == sft.VERIFY_ASK}
  verifies = [e for e in examples if e.task == "verify"]
  assert asks and len(verifies) >= len(asks)
  for e in asks.values():
    assert len(e.images) == 1 and e.prompt.count(prompts.IMAGE_PLACEHOLDER) == 1
    text = e.prompt.split('Instruction: "')[1].split('"\n')[0]
    wanted = oracle_lib.implied(oracle.garment(e.images[0]), text)
    assert e.answer == (f"Picture 1: {oracle.describe(e.images[0])}. {sft.ASKED_MARKER} "
                        + ", ".join(f"{a} {wanted.get(a)}" for a in ("colour", "pattern", "sleeves", "length",
                                                                     "neckline")))
  turns = prompt_files.VerifyTurns.load()
  for e in verifies:
    text = e.prompt.split('Instruction: "')[1].split('"\n')[0]
    first = asks[(e.source, turns.first(text))]
    assert first.images == e.images[:1]
    assert e.prompt == turns.second(text, first.answer)
    assert e.prompt.index(sft.ASKED_MARKER) < e.prompt.index("Picture 2: " + prompts.IMAGE_PLACEHOLDER)
    reading, decision = e.answer.split(f". {sft.ANSWER_MARKER} ")
    second, checks = reading.split(f". {sft.CHECK_MARKER} ")
    assert second == f"Picture 2: {oracle.describe(e.images[1])}"
    wanted, seen = oracle_lib.implied(oracle.garment(e.images[0]), text), oracle.garment(e.images[1])
    assert checks == ", ".join(  # both values, then their comparison
        f"{a} {wanted.get(a)} vs {seen.get(a)} {'same' if wanted.get(a) == seen.get(a) else 'differs'}"
        for a in ("category", "colour", "pattern", "sleeves", "length", "neckline"))
    assert decision == ("yes" if oracle.judge(e.images[0], text, e.images[1]) else "no") == (
        "no" if sft.DIFFERS in checks else "yes")
  with pytest.raises(ValueError, match="teach.reasoning"):
    sft.SFTConfig(lengths=LENGTHS, batch_size=4, verify_turns=2)
  with pytest.raises(ValueError, match="calibrate.verify_turns"):
    sft.SFTConfig(lengths=LENGTHS, batch_size=4, reasoning="describe", verify_turns=3)
