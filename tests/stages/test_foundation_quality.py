"""F's quality figures on the tiny FashionIQ world's val split: a stand-in F that answers as the oracle scores 1.0
everywhere (direct and describe-then-decide), a random tiny F runs end to end with every figure in [0, 1]."""

import re
import time

import ml_collections
import numpy as np
import pytest

from configs import tiny as demo
from recall_jax import main
from recall_jax.data import pipeline
from recall_jax.generate import sft
from recall_jax.data.synthetic.oracle import Oracle
from recall_jax.generate import GenerateOutput, Sampler, ScoreOutput, prompt_files
from recall_jax.stages import common, foundation_quality

HEADER = "<|im_start|>assistant\n"
PICTURE = re.compile(r"Picture \d+: <\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>")


def _config(reasoning="describe"):
  cfg = demo.get_config()
  cfg.world.scale = "tiny"
  cfg.world.image_size = 56
  cfg.data.image_buckets = 56
  cfg.data.dataset = "fashioniq"
  cfg.model.tiny_tokenizer = "bytes"  # the fixed byte-level tokenizer and default tiny shapes: nothing to train
  cfg.model.tiny = ml_collections.ConfigDict({"text": {}, "vision": {}})
  cfg.teach.reasoning = cfg.calibrate.verify_reasoning = reasoning
  cfg.calibrate.batch_size = 4
  cfg.calibrate.prompt_lengths = (1024,)  # byte-level prompts: a rewrite prompt is ~700 tokens
  return cfg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("quality"))
  main.run(_config(), workdir, ["prepare"])
  return workdir


def _val_images(cfg, workdir):
  return {n: p for s in common.read_splits(cfg, workdir, "val") for n, p in s.images.items()}


class OracleSampler(Sampler):
  """A stand-in F that knows the world: it recognises each image by its pixels, reads the prompt (question, verify
  or minimal-JSON rewrite) and writes the oracle's answer in the format the teach stage trains (`describe`: with
  its description first). Scoring puts the logit on the next token of that answer when the prompt's answer part
  is a prefix of it (teacher forcing), and is undecided (equal logits) otherwise."""

  def __init__(self, tokenizer, images, encode_cfg, describe):
    super().__init__(None, tokenizer)
    self.oracle, self.describe = Oracle(images), describe
    self.by_pixels = {}
    for name in images:
      pixels, grid = pipeline.encode_images([pipeline.FileImages(images)(name)], encode_cfg)
      self.by_pixels[pixels[0, :int(np.prod(grid[0]))].tobytes()] = name
    self.rewrite_t = prompt_files.load_template(prompt_files.REWRITE_TEMPLATES["minimal_json"]).split("{text}")
    self.verify_t = prompt_files.load_template(prompt_files.VERIFY_TEMPLATE).split("{text}")

  def _rows(self, input_ids, attention_mask, pixel_values, image_grid_thw):
    """Per row: (the answer the oracle gives, the token ids after the assistant header)."""
    sizes = np.prod(np.asarray(image_grid_thw), axis=1)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    names = [self.by_pixels[np.asarray(pixel_values)[a:b].tobytes()] for a, b in zip(offsets[:-1], offsets[1:])]
    header = self.tokenizer.encode(HEADER, add_special_tokens=False)
    out, used = [], 0
    for ids, mask in zip(np.asarray(input_ids), np.asarray(attention_mask)):
      ids = ids[mask.astype(bool)].tolist()
      at = max(k for k in range(len(ids)) if ids[k:k + len(header)] == header) + len(header)
      prompt = self.tokenizer.decode(ids[:at], skip_special_tokens=False)
      content = PICTURE.sub("", prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0])
      k = prompt.count("<|vision_start|>")
      pictures, used = names[used:used + k], used + k
      out.append((self._answer(content, pictures), ids[at:]))
    return out

  def _answer(self, content, pictures):
    o = self.oracle
    for (pre, post), kind in ((self.rewrite_t, "rewrite"), (self.verify_t, "verify")):
      if content.startswith(pre) and content.endswith(post):
        text = content[len(pre):len(content) - len(post)]
        ref, candidate = pictures
        summary = sft.two_picture_summary(o, ref, candidate)
        if kind == "rewrite":
          return sft.rewrite_answer(text, sft.closest_edit(o, ref, candidate, text), summary if self.describe else None)
        yes = o.judge(ref, text, candidate)
        return sft.decision_answer(summary, yes) if self.describe else ("yes" if yes else "no")
    yes = o.answer(pictures[0], content)
    return sft.decision_answer(o.describe(pictures[0]), yes) if self.describe else ("yes" if yes else "no")

  def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *, max_new_tokens,
               **kw):
    rows = [(self.tokenizer.encode(a, add_special_tokens=False) + [self.eos_ids[0]])[:max_new_tokens]
            for a, _ in self._rows(input_ids, attention_mask, pixel_values, image_grid_thw)]
    tokens = np.full((len(rows), max_new_tokens), self.pad_id, np.int32)
    for k, r in enumerate(rows):
      tokens[k, :len(r)] = r
    return GenerateOutput(tokens=tokens, log_probs=np.zeros(tokens.shape, np.float32),
                          lengths=np.asarray([len(r) for r in rows], np.int32))

  def score_candidates(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                       candidate_ids):
    logits = np.zeros((len(input_ids), len(candidate_ids)), np.float32)
    for row, (answer, written) in enumerate(self._rows(input_ids, attention_mask, pixel_values, image_grid_thw)):
      want = self.tokenizer.encode(answer, add_special_tokens=False)
      if want[:len(written)] == written and len(written) < len(want):
        logits[row] = [20.0 * (c == want[len(written)]) for c in candidate_ids]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return ScoreOutput(logits=logits, log_probs=log_probs)


@pytest.mark.parametrize("reasoning", ["direct", "describe"])
def test_an_oracle_f_scores_one_everywhere(prepared, reasoning):
  cfg = _config(reasoning)
  cfg.calibrate.max_new_tokens = 600  # the stand-in costs nothing; byte-level answers are long
  cfg.calibrate.describe_max_tokens = 300
  images = _val_images(cfg, prepared)
  _, tokenizer = common.load_base_model(cfg, prepared)
  sampler = OracleSampler(tokenizer, images, common.encode_config(cfg), describe=reasoning == "describe")
  q = foundation_quality.evaluate_foundation(None, tokenizer, cfg, prepared, sampler=sampler)
  for key in ("vqa_accuracy", "rewrite_parseable", "rewrite_oracle_correct", "verify_agreement"):
    assert q[key] == 1.0, (key, q)
  assert q["verify_yes_rate"] == 0.5  # the balanced items
  assert q["vqa_no_marker"] == q["verify_no_marker"] == 0
  counts = q["counts"]
  assert counts["vqa_images"] == len(images) <= cfg.teach.quality.vqa_images  # the tiny world: every val image
  assert counts["vqa_questions"] == 2 * counts["vqa_images"]
  assert counts["rewrite_attempted"] > 0 and counts["verify_items"] == 4 * counts["verify_queries_used"] > 0
  # "Is it red?" over 32 of the val images: the std of (nearly) 0/1 answers, the oracle's.
  names = sorted(images)
  probed = [names[i] for i in foundation_quality._draw(len(names), 32, cfg.seed, foundation_quality.PROBES)]
  red = [Oracle(images).answer(n, "Is it red?") for n in probed]
  assert counts["image_dependence_images"] == len(probed) == 32 and 0 < sum(red) < 32
  assert q["image_dependence"] == pytest.approx(np.std(red), abs=1e-3)
  assert len(q["examples"]["rewrites"]) == len(q["examples"]["verify"]) == 3
  texts = [e["verify_text"] for e in q["examples"]["verify"]]
  assert all(t.startswith("Picture 1: ") for t in texts) if reasoning == "describe" else texts == [None] * 3


def test_a_random_tiny_f_runs_end_to_end(prepared):
  cfg = _config("describe")
  cfg.teach.quality.update({"vqa_images": 3, "rewrite_queries": 2, "verify_queries": 1})
  cfg.calibrate.max_new_tokens = 4
  cfg.calibrate.describe_max_tokens = 4
  model, tokenizer = common.load_base_model(cfg, prepared)
  started = time.perf_counter()
  q = foundation_quality.evaluate_foundation(model, tokenizer, cfg, prepared)
  assert time.perf_counter() - started < 120
  for key in ("vqa_accuracy", "rewrite_parseable", "rewrite_oracle_correct", "verify_agreement", "verify_yes_rate",
              "image_dependence"):
    assert 0.0 <= q[key] <= 1.0, (key, q[key])
  counts = q["counts"]
  assert (counts["vqa_images"], counts["vqa_questions"], counts["rewrite_queries"]) == (3, 6, 2)
  assert q["vqa_no_marker"] <= 6 and q["reasoning"] == {"vqa": "describe", "verify": "describe"}
  assert q == foundation_quality.evaluate_foundation(model, tokenizer, cfg, prepared) | {"seconds": q["seconds"]}
