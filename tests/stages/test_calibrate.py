"""Stage 3 end to end on the tiny world with the tiny random checkpoint: files and statistics, malformed generations
counted, VQA P(yes) against a full forward, oracle agreement, and resume after a crash."""

import json
import os

import numpy as np
import pytest

from configs import tiny as demo
from recall_jax import main
from recall_jax.data.pipeline import FileImages
from recall_jax.data.synthetic.oracle import Oracle
from recall_jax.generate import prompt_files
from recall_jax.generate.sampler import Sampler
from recall_jax.stages import artifacts, calibrate, common, mine

RECORDS = 6
BATCH = 4
INTENT = {"span": "x", "edit": "keep", "new_span": "is red"}
# Scripted generations, one per record in order: two parse, four are malformed in different ways.
SCRIPT = [
    json.dumps({"captions": {}, "intents": [INTENT], "new_text": "is red"}),
    "garbage without braces",
    '```json\n{"new_text": "uncertain"}\n```',
    'Here: {"new_text": "has a collar and is blue"} done',
    "[1, 2]",
    '{"new_text": "is red instead of red"}',
]


def _config():
  cfg = demo.get_config()
  cfg.world.scale = "tiny"
  cfg.world.image_size = 56
  cfg.data.image_buckets = 56
  cfg.data.dataset = "cirr"
  cfg.calibrate.max_records = RECORDS
  cfg.calibrate.batch_size = BATCH
  cfg.calibrate.max_new_tokens = 6
  cfg.calibrate.sheet_samples = 3
  return cfg


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
  """A workdir with the prepare and mine stages done, and the base model."""
  workdir = str(tmp_path_factory.mktemp("calibrate"))
  cfg = _config()
  main.run(cfg, workdir, ["prepare", "mine"])
  assert len(artifacts.read_jsonl(os.path.join(workdir, "mine", mine.MINED))) >= RECORDS
  model, tokenizer = common.load_base_model(cfg, workdir)
  return workdir, model, tokenizer


class CountingSampler(Sampler):
  """The real sampler; counts generate calls, optionally crashes on one, optionally replaces the decoded texts."""

  def __init__(self, *args, crash_on=None, script=None, **kw):
    super().__init__(*args, **kw)
    self.calls, self.crash_on, self.script, self.decoded = 0, crash_on, script, 0

  def generate(self, *args, **kw):
    self.calls += 1
    if self.calls == self.crash_on:
      raise RuntimeError("simulated crash")
    return super().generate(*args, **kw)

  def decode_text(self, output, skip_special_tokens=True):
    texts = super().decode_text(output, skip_special_tokens)
    if self.script is not None:
      texts = [self.script[(self.decoded + k) % len(self.script)] for k in range(len(texts))]
      self.decoded += len(texts)
    return texts


def _stage(cfg, workdir, sampler):
  return artifacts.run_stage(workdir, "calibrate", lambda d: calibrate.run(cfg, workdir, d, sampler=sampler))


def _fresh_run_dir(workdir, tmp_path):
  """A new workdir sharing the finished prepare and mine stages of the module's run."""
  run_dir = str(tmp_path / "run")
  os.makedirs(run_dir)
  for stage in ("prepare", "mine"):
    os.symlink(os.path.join(workdir, stage), os.path.join(run_dir, stage))
  return run_dir


def test_staged_cot_statistics_vqa_and_oracle(mined, tmp_path):
  workdir, model, tokenizer = mined
  run_dir = _fresh_run_dir(workdir, tmp_path)
  cfg = _config()
  cfg.calibrate.prompt_mode = "staged_cot"
  cfg.calibrate.decomposed_verification = True
  cfg.calibrate.vqa_threshold = 0.0  # keep every parsed rewrite, so corrective.jsonl has content
  sampler = CountingSampler(model, tokenizer, cache_buckets=cfg.calibrate.prompt_lengths, script=SCRIPT)
  manifest = _stage(cfg, run_dir, sampler)
  out = os.path.join(run_dir, "calibrate")
  assert sampler.calls == 2  # 6 records in batches of 4
  assert not os.path.exists(os.path.join(out, calibrate.PARTIAL))
  assert os.path.getsize(os.path.join(out, calibrate.SHEET)) > 1000

  assert manifest["throughput"]["samples"] == RECORDS and manifest["throughput"]["samples_per_s"] > 0
  stats = manifest["statistics"]
  assert stats["generated"] == RECORDS == stats["parsed"] + stats["rejected"]
  assert stats["parsed"] == 2 and stats["kept"] + stats["dropped_by_vqa"] == stats["parsed"]
  assert stats["rejected_by_reason"] == {"no_json": 1, "uncertain": 1, "not_an_object": 1, "self_contradiction": 1}

  samples = artifacts.read_jsonl(os.path.join(out, calibrate.GENERATIONS))
  mined_records = artifacts.read_jsonl(os.path.join(workdir, "mine", mine.MINED))[:RECORDS]
  assert [s["id"] for s in samples] == [r["id"] for r in mined_records]
  assert [s["raw_generation"] for s in samples] == SCRIPT
  assert [s["text"] for s in samples] == ["is red", None, None, "has a collar and is blue", None, None]
  corrective = artifacts.read_jsonl(os.path.join(out, calibrate.CORRECTIVE))
  assert [c["id"] for c in corrective] == [samples[0]["id"], samples[3]["id"]]
  for c, r in zip(corrective, [mined_records[0], mined_records[3]]):
    assert c["captions"] == [c["text"]] and c["targets"] == [r["instance"]]
    assert (c["reference"], c["group"], c["original_text"]) == (r["reference"], r["group"], r["text"])
    assert (c["instance_rank"], c["gt_rank"], c["original_targets"]) == (r["instance_rank"], r["gt_rank"],
                                                                          r["targets"])

  # Decomposed verification: the intent statement is verified too and P(yes) is the minimum.
  first = samples[0]
  assert len(first["p_yes_statements"]) == 1 and samples[3]["p_yes_statements"] == []
  assert first["p_yes"] == min(first["p_yes_holistic"], *first["p_yes_statements"])

  # P(yes) = softmax over the "no" / "yes" logits of a full forward of the verification prompt.
  no_id, yes_id = manifest["answer_token_ids"]
  assert [no_id, yes_id] == [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("no", "yes")]
  images = {}
  for split in common.read_splits(cfg, workdir, "train"):
    images.update(split.images)
  for s in (samples[0], samples[3]):
    inputs = calibrate.build_inputs(
        tokenizer, [prompt_files.two_picture_prompt(prompt_files.load_template("verify"), s["text"])],
        [(s["reference"], s["instance"])], FileImages(images), common.encode_config(cfg), cfg.calibrate.prompt_lengths)
    logits = np.asarray(model(**inputs).logits, np.float64)[0, -1, [no_id, yes_id]]
    np.testing.assert_allclose(s["p_yes_holistic"], np.exp(logits[1]) / np.exp(logits).sum(), rtol=1e-5)

  # Oracle agreement over the scene graphs, recomputed directly.
  oracle = Oracle(images)
  correct = []
  for s in (samples[0], samples[3]):
    correct.append(oracle.judge(s["reference"], s["text"], s["instance"]))
    assert s["oracle_correct"] == correct[-1] and s["oracle_unparseable"] is False
  assert manifest["oracle"] == "scene graphs"
  assert stats["oracle"]["judged"] == 2
  assert stats["oracle"]["rewrite_accuracy"] == pytest.approx(np.mean(correct))
  assert stats["oracle"]["vqa_agreement"] == pytest.approx(np.mean(correct))  # everything parsed was kept


def test_minimal_json_resume_after_crash(mined, tmp_path):
  workdir, model, tokenizer = mined
  run_dir = _fresh_run_dir(workdir, tmp_path)
  cfg = _config()
  buckets = cfg.calibrate.prompt_lengths
  crashing = CountingSampler(model, tokenizer, cache_buckets=buckets, crash_on=2)
  with pytest.raises(RuntimeError, match="simulated crash"):
    _stage(cfg, run_dir, crashing)
  out = os.path.join(run_dir, "calibrate")
  partial = os.path.join(out, calibrate.PARTIAL)
  assert not artifacts.is_done(run_dir, "calibrate")
  first_batch = artifacts.read_jsonl(partial)
  assert len(first_batch) == BATCH
  # A crash in the middle of a write leaves a torn line: it is dropped and that sample generated again.
  with open(partial) as f:
    lines = f.readlines()
  with open(partial, "w") as f:
    f.writelines(lines[:-1] + [lines[-1][:40]])

  resumed = CountingSampler(model, tokenizer, cache_buckets=buckets)
  manifest = _stage(cfg, run_dir, resumed)
  assert resumed.calls == 1  # the 3 unfinished samples fit one batch; the 3 finished ones are not redone
  samples = artifacts.read_jsonl(os.path.join(out, calibrate.GENERATIONS))
  mined_ids = [r["id"] for r in artifacts.read_jsonl(os.path.join(workdir, "mine", mine.MINED))[:RECORDS]]
  assert [s["id"] for s in samples] == mined_ids
  assert samples[:BATCH - 1] == first_batch[:BATCH - 1]
  stats = manifest["statistics"]
  # Random weights write noise: every generation is rejected, counted by reason, none crashes the stage.
  assert stats["generated"] == RECORDS == stats["parsed"] + stats["rejected"]
  assert sum(stats["rejected_by_reason"].values()) == stats["rejected"]
  assert stats["kept"] == len(artifacts.read_jsonl(os.path.join(out, calibrate.CORRECTIVE)))
  assert all(s["prompt_mode"] == "minimal_json" and s["new_tokens"] <= 6 for s in samples)
  assert not os.path.exists(partial) and artifacts.is_done(run_dir, "calibrate")


def _run_dir(workdir, tmp_path, name):
  os.makedirs(tmp_path / name)
  return _fresh_run_dir(workdir, tmp_path / name)


def test_vqa_filter_off_keeps_every_parsed_rewrite(mined, tmp_path):
  """Table 4's "+ CoT generation" row: the same generations re-filtered, every parsed rewrite kept, P(yes) kept."""
  workdir, model, tokenizer = mined
  cfg = _config()
  cfg.calibrate.prompt_mode = "staged_cot"
  first = _run_dir(workdir, tmp_path, "first")
  sampler = CountingSampler(model, tokenizer, cache_buckets=cfg.calibrate.prompt_lengths, script=SCRIPT)
  _stage(cfg, first, sampler)
  generations = os.path.join(first, "calibrate", calibrate.GENERATIONS)
  parsed = [s for s in artifacts.read_jsonl(generations) if s["text"] is not None]
  assert len(parsed) == 2 and parsed[0]["p_yes"] != parsed[1]["p_yes"]
  # A threshold between the two P(yes): the filter keeps exactly one of them.
  cfg.calibrate.vqa_threshold = float(np.mean([s["p_yes"] for s in parsed]))
  runs = {}
  for vqa_filter in (True, False):
    cfg.calibrate.vqa_filter = vqa_filter
    run_dir = _run_dir(workdir, tmp_path, f"filter_{vqa_filter}")
    os.makedirs(os.path.join(run_dir, "calibrate"))
    calibrate.seed_partial(generations, os.path.join(run_dir, "calibrate"))
    idle = CountingSampler(model, tokenizer, cache_buckets=cfg.calibrate.prompt_lengths)
    manifest = _stage(cfg, run_dir, idle)
    assert idle.calls == 0  # nothing generated again: only the keep decision is new
    samples = artifacts.read_jsonl(os.path.join(run_dir, "calibrate", calibrate.GENERATIONS))
    corrective = artifacts.read_jsonl(os.path.join(run_dir, "calibrate", calibrate.CORRECTIVE))
    runs[vqa_filter] = (manifest, samples, corrective)
  (on, on_samples, on_kept), (off, off_samples, off_kept) = runs[True], runs[False]
  assert [s["p_yes"] for s in on_samples] == [s["p_yes"] for s in off_samples]  # VQA scores still recorded
  assert [s["vqa_pass"] for s in on_samples] == [s["vqa_pass"] for s in off_samples]
  assert len(on_kept) == 1 and on["statistics"]["dropped_by_vqa"] == 1
  assert [c["id"] for c in off_kept] == [s["id"] for s in parsed]
  assert off["statistics"]["kept"] == off["statistics"]["parsed"] == 2 and off["statistics"]["dropped_by_vqa"] == 0
  assert off["statistics"]["below_vqa_threshold"] == on["statistics"]["below_vqa_threshold"] == 1
  assert (on["vqa_filter"], off["vqa_filter"]) == (True, False)


def test_oracle_rewriter_writes_oracle_correct_rewrites(mined, tmp_path):
  """The "oracle F" upper bound: the world's oracle writes every rewrite, F only verifies it."""
  workdir, model, tokenizer = mined
  cfg = _config()
  cfg.calibrate.rewriter = "oracle"
  run_dir = _run_dir(workdir, tmp_path, "oracle")
  sampler = CountingSampler(model, tokenizer, cache_buckets=cfg.calibrate.prompt_lengths)
  manifest = _stage(cfg, run_dir, sampler)
  assert sampler.calls == 0 and manifest["rewriter"] == "oracle"
  samples = artifacts.read_jsonl(os.path.join(run_dir, "calibrate", calibrate.GENERATIONS))
  images = {}
  for split in common.read_splits(cfg, workdir, "train"):
    images.update(split.images)
  oracle = Oracle(images)
  written = [s for s in samples if s["text"] is not None]
  assert len(written) >= RECORDS // 2
  for s in samples:
    assert s["rewriter"] == "oracle"
    if s["text"] is None:
      assert s["parse_status"] in (calibrate.ORACLE_NO_EDIT, "unchanged"), s["parse_status"]
      continue
    assert json.loads(s["raw_generation"])["segments"]  # the minimal-JSON answer F is taught to write
    assert oracle.judge(s["reference"], s["text"], s["instance"]) and s["oracle_correct"]
    assert not oracle.judge(s["reference"], s["text"], s["original_targets"][0]) or s["text"] == s["original_text"]
    assert 0.0 <= s["p_yes"] <= 1.0  # still verified by F
  assert manifest["statistics"]["oracle"]["rewrite_accuracy"] == 1.0


def test_rewriter_is_checked(tmp_path):
  path = str(tmp_path / calibrate.PARTIAL)
  with open(path, "w") as f:
    f.write(json.dumps({"id": "a", "prompt_mode": "minimal_json"}) + "\n")
  with pytest.raises(ValueError, match="calibrate.rewriter"):
    calibrate.read_partial(path, "minimal_json", "oracle")
  cfg = _config()
  cfg.calibrate.rewriter = "human"
  with pytest.raises(ValueError, match="calibrate.rewriter"):
    calibrate.Calibrator(None, None, cfg.calibrate, None, None)


def test_prompt_mode_mismatch_on_resume_is_an_error(tmp_path):
  path = str(tmp_path / calibrate.PARTIAL)
  with open(path, "w") as f:
    f.write(json.dumps({"id": "a", "prompt_mode": "staged_cot"}) + "\n")
  with pytest.raises(ValueError, match="calibrate.prompt_mode"):
    calibrate.read_partial(path, "minimal_json")


def test_answer_token_ids_must_differ(mined):
  _, _, tokenizer = mined
  with pytest.raises(ValueError, match="calibrate.answer_words"):
    calibrate.answer_token_ids(tokenizer, ("yes", "yeah"))


def test_prompt_templates_from_another_directory(tmp_path):
  assert "{text}" in prompt_files.load_template("verify")
  with pytest.raises(FileNotFoundError, match="verify.txt"):
    prompt_files.load_template("verify", str(tmp_path))
  (tmp_path / "verify.txt").write_text('Is "{text}" true of Picture 2? {"json": "braces stay"}\n')
  template = prompt_files.load_template("verify", str(tmp_path))
  assert prompt_files.fill(template, "is red") == 'Is "is red" true of Picture 2? {"json": "braces stay"}'
  (tmp_path / "verify.txt").write_text("no placeholder")
  with pytest.raises(ValueError, match="exactly once"):
    prompt_files.load_template("verify", str(tmp_path))


def test_packaged_prompt_sets_by_name():
  assert prompt_files.resolve_dir("") == prompt_files.PACKAGED_DIR
  assert prompt_files.resolve_dir("compact") == os.path.join(prompt_files.PACKAGED_DIR, "compact")
  assert prompt_files.resolve_dir("/my/prompts") == "/my/prompts"
  names = [*prompt_files.REWRITE_TEMPLATES.values(), prompt_files.VERIFY_TEMPLATE, prompt_files.VERIFY_INTENT_TEMPLATE]
  for name in names:  # the compact set is complete, and shorter than the paper-style one
    assert len(prompt_files.load_template(name, "compact")) < len(prompt_files.load_template(name))


def test_statistics_precision_of_kept_and_of_dropped():
  def sample(kept, correct, status="ok"):
    return {"parse_status": status, "text": "t" if status == "ok" else None, "kept": kept, "vqa_pass": kept,
            "hit_max_new_tokens": False, "oracle_correct": correct,
            "oracle_unparseable": False if correct is not None else None}
  samples = [sample(True, True), sample(True, False), sample(False, True), sample(False, False),
             sample(False, False), sample(False, None, status="no_json")]
  stats = calibrate.statistics(samples, num_mined=9)
  assert (stats["parsed"], stats["kept"], stats["dropped_by_vqa"], stats["rejected"]) == (5, 2, 3, 1)
  assert stats["oracle"]["precision_of_kept"] == pytest.approx(1 / 2)
  assert stats["oracle"]["precision_of_dropped"] == pytest.approx(1 / 3)  # the VQA filter's false rejections
  assert calibrate.statistics(samples[:2], 2)["oracle"]["precision_of_dropped"] is None


class _OneBadSample:
  """A calibrator whose rewrites all parse and whose verification raises on any batch holding the text 'is bad'."""

  def __init__(self, ccfg, texts):
    self.ccfg, self.texts, self.oracle_rewriter, self.parse_mode = ccfg, texts, None, ccfg.prompt_mode

  def rewrite(self, items, rng):
    return [json.dumps({"new_text": t}) for t in self.texts[:len(items)]], [3] * len(items)

  def verify(self, items, statements):
    if any(text == "is bad" for _, _, text in items):
      raise UnicodeEncodeError("utf-8", "x", 0, 1, "a sample the tokenizer cannot take")
    n = len(items)
    return (np.full((n,), 0.97), np.full((n,), 0.97), [[] for _ in items],
            [{"verify_text": None, "verify_statement_texts": [], "verify_no_marker": False} for _ in items])


def test_a_sample_whose_verification_fails_is_rejected_and_the_batch_goes_on():
  cfg = _config()
  cfg.calibrate.prompt_mode = "staged_cot"
  record = {"id": "q#i", "qid": "q", "dataset": "cirr", "split": "train", "category": None, "reference": "r",
            "instance": "i", "group": "g", "text": "is blue", "captions": ["is blue"], "targets": ["t"],
            "instance_rank": 1, "gt_rank": 3, "instance_similarity": 0.5, "gt_similarity": 0.4}
  batch = [dict(record, id=f"q#{k}") for k in range(3)]
  out = calibrate.calibrate_batch(_OneBadSample(cfg.calibrate, ["is red", "is bad", "is green"]), batch, None, None)
  assert [s["parse_status"] for s in out] == ["ok", calibrate.VERIFY_ERROR, "ok"]
  assert [s["kept"] for s in out] == [True, False, True]
  assert out[1]["error"].startswith("UnicodeEncodeError") and out[0]["error"] is None
  assert calibrate.statistics(out, 3)["rejected_by_reason"] == {calibrate.VERIFY_ERROR: 1}
