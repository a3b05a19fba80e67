"""Stage 3, generative calibration: rewrite each mined failure's text so it is true for its informative instance,
verify the rewrite with a strict yes/no question, and keep the confident ones as corrective triplets.

For every record of the mine stage, the frozen foundation model (base weights, no adapters) sees Picture 1 = the
reference, Picture 2 = the informative instance and the original text, in one of two prompt modes
(cfg.calibrate.prompt_mode, templates in recall_jax/generate/prompts/ or cfg.calibrate.prompt_dir):
"minimal_json" (rewrite segments, final text rebuilt from the spans) or "staged_cot" (captions, <= 6 intents,
questions, answers, local edits, new text). `generate.parse` reads the output or names why it is rejected.

VQA quality control: the same model answers the `verify` template over (reference, instance, new text);
P(yes) = softmax over the logits of the answer words' tokens (cfg.calibrate.answer_words, default "no", "yes") at
the answer position, i.e. right after the assistant header. Each word's FIRST token as the tokenizer encodes it is
used: one token for Qwen's vocabulary; with the tiny byte-level test tokenizer that is the first byte ("n" / "y").
With cfg.calibrate.verify_reasoning = "describe" (an F taught with teach.reasoning = "describe"), F first writes what
the pictures show (greedy, up to calibrate.describe_max_tokens tokens), and P(yes) is read right after its
"Answer:", over the first tokens of " no" / " yes" (`generate.decide`); a description without the marker gives
P(yes) = 0, counted as `verify_no_marker`, and each sample keeps what F wrote (`verify_text`).
With cfg.calibrate.verify_turns = 2 the verification is a conversation of two turns (`verify_ask`, then
`verify_check` templates; prompt_files.VerifyTurns): F reads Picture 1 and the text into Picture 1's caption and
the asked garment's attributes, and only then sees Picture 2, checks it and decides.
The triplet is kept when P(yes) >= cfg.calibrate.vqa_threshold. With cfg.calibrate.decomposed_verification, each
per-intent statement is verified too (`verify_intent` template) and P(yes) is the minimum over all questions.

Ablations: cfg.calibrate.vqa_filter = False keeps every parsed rewrite (P(yes) is still computed and recorded,
`vqa_pass`); cfg.calibrate.rewriter = "oracle" has the world's oracle write each rewrite (the most minimal of its
paraphrases of the edit reference -> instance, as the minimal-JSON answer the teach stage trains F to give), parsed
and validated like the model's and verified by F the same way: an upper bound on the rewriting, never the default.
The keep decision is re-derived from the recorded P(yes) at the end of every run, so resumed samples (or another
run's generations, `seed_partial`) follow the current filter settings.

Resuming: finished samples are appended to generations.partial.jsonl after every batch (keyed by record id) and
skipped on restart; generations.jsonl (every sample, in mined order), corrective.jsonl (the kept ones, as triplets
with provenance) and calibrated.png are written at the end, and the partial file removed.

Oracle agreement (synthetic world: images with scene graphs): each parsed rewrite is judged by the world's oracle
(a text it cannot read counts as incorrect), and the VQA decisions are compared with those judgements.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from recall_jax import faults, files, parallel, viz
from recall_jax.data import pipeline
from recall_jax.generate import sft
from recall_jax.data.synthetic import TextParseError
from recall_jax.data.synthetic.oracle import Oracle
from recall_jax.generate import decide, parse, prompt_files
from recall_jax.generate.decide import answer_token_ids, build_inputs
from recall_jax.generate.sampler import Sampler
from recall_jax.generate.sampling import SamplingConfig
from recall_jax.stages import artifacts, common, data_source, mine
from recall_jax.progress import Progress

log = logging.getLogger("recall_jax")

PARTIAL = "generations.partial.jsonl"
GENERATIONS = "generations.jsonl"
CORRECTIVE = "corrective.jsonl"
SHEET = "calibrated.png"
REWRITERS = ("model", "oracle")
ORACLE_NO_EDIT = "oracle_no_edit"  # parse status when the oracle cannot express reference -> instance


def _fill(items: list, size: int) -> list:
  """items padded to `size` by repeating the last one: every call has the same batch shape (one compilation)."""
  return items + [items[-1]] * (size - len(items))


class OracleRewriter:
  """The rewrites of config calibrate.rewriter = "oracle": the oracle's most minimal paraphrase of the edit
  reference -> instance (sft.closest_edit), written as the minimal-JSON answer (sft.rewrite_answer)."""

  parse_mode = "minimal_json"

  def __init__(self, oracle: Oracle):
    self.oracle = oracle

  def __call__(self, reference: str, instance: str, text: str) -> str:
    try:
      return sft.rewrite_answer(text, sft.closest_edit(self.oracle, reference, instance, text))
    except ValueError:  # same garment, or another category: no edit the world's language can state
      return ""


class Calibrator:
  """The model calls of the stage: batched rewriting and batched yes/no verification."""

  def __init__(self, sampler: Sampler, tokenizer: Any, ccfg: ConfigDict, encode_cfg: pipeline.EncodeConfig,
               load: Callable, oracle: Optional[Oracle] = None):
    if ccfg.prompt_mode not in parse.MODES:
      raise ValueError(f"config calibrate.prompt_mode must be one of {parse.MODES}, got {ccfg.prompt_mode!r}")
    if ccfg.rewriter not in REWRITERS:
      raise ValueError(f"config calibrate.rewriter must be one of {REWRITERS}, got {ccfg.rewriter!r}")
    if ccfg.rewriter == "oracle" and oracle is None:
      raise ValueError("config calibrate.rewriter = 'oracle' needs the synthetic world's scene graphs beside every "
                       "mined image (data.root = '')")
    if not 0.0 <= ccfg.vqa_threshold <= 1.0:
      raise ValueError(f"config calibrate.vqa_threshold must be in [0, 1], got {ccfg.vqa_threshold}")
    if ccfg.batch_size < 1 or ccfg.max_new_tokens < 1:
      raise ValueError("config calibrate.batch_size and calibrate.max_new_tokens must be >= 1")
    if ccfg.verify_reasoning not in decide.REASONING:
      raise ValueError(f"config calibrate.verify_reasoning must be one of {decide.REASONING}, got "
                       f"{ccfg.verify_reasoning!r}")
    if ccfg.verify_turns not in sft.VERIFY_TURNS:
      raise ValueError(f"config calibrate.verify_turns must be one of {sft.VERIFY_TURNS}, got {ccfg.verify_turns}")
    if ccfg.verify_turns == 2 and ccfg.verify_reasoning != "describe":
      raise ValueError("config calibrate.verify_turns = 2 is a reading in two turns, which needs "
                       f"calibrate.verify_reasoning = 'describe', got {ccfg.verify_reasoning!r}")
    if ccfg.describe_max_tokens < 1:
      raise ValueError(f"config calibrate.describe_max_tokens must be >= 1, got {ccfg.describe_max_tokens}")
    self.sampler, self.tokenizer, self.ccfg = sampler, tokenizer, ccfg
    self.encode_cfg, self.load = encode_cfg, load
    self.rewrite_template = prompt_files.load_template(prompt_files.REWRITE_TEMPLATES[ccfg.prompt_mode],
                                                       ccfg.prompt_dir)
    self.verify_template = prompt_files.load_template(prompt_files.VERIFY_TEMPLATE, ccfg.prompt_dir)
    self.verify_turns = prompt_files.VerifyTurns.load(ccfg.prompt_dir) if ccfg.verify_turns == 2 else None
    self.intent_template = (prompt_files.load_template(prompt_files.VERIFY_INTENT_TEMPLATE, ccfg.prompt_dir)
                            if ccfg.decomposed_verification else None)
    self.answer_ids = answer_token_ids(tokenizer, ccfg.answer_words, ccfg.verify_reasoning)
    self.sampling = SamplingConfig(temperature=ccfg.temperature, top_k=ccfg.top_k, top_p=ccfg.top_p)
    self.oracle_rewriter = OracleRewriter(oracle) if ccfg.rewriter == "oracle" else None
    self.parse_mode = self.oracle_rewriter.parse_mode if self.oracle_rewriter else ccfg.prompt_mode

  def inputs(self, template: str, items: Sequence[tuple[str, str, str]]) -> dict[str, np.ndarray]:
    """items: (reference, instance, text) -> model inputs of the filled template."""
    return build_inputs(self.tokenizer, [prompt_files.two_picture_prompt(template, t) for _, _, t in items],
                        [(r, i) for r, i, _ in items], self.load, self.encode_cfg, self.ccfg.prompt_lengths)

  def rewrite(self, items: Sequence[tuple[str, str, str]], rng: Optional[jax.Array]) -> tuple[list[str], list[int]]:
    """(raw generations, new-token counts) for up to batch_size items (the oracle's answers: 0 tokens)."""
    n = len(items)
    if self.oracle_rewriter is not None:
      return [self.oracle_rewriter(*item) for item in items], [0] * n
    out = self.sampler.generate(**self.inputs(self.rewrite_template, _fill(list(items), self.ccfg.batch_size)),
                                max_new_tokens=self.ccfg.max_new_tokens, sampling=self.sampling, rng=rng)
    return self.sampler.decode_text(out)[:n], np.asarray(out.lengths)[:n].tolist()

  def decide(self, template: str, items: Sequence[tuple[str, str, str]]) -> decide.Decisions:
    """The verification prompt's decisions per item (calibrate.verify_reasoning), in batches of batch_size."""
    c = self.ccfg
    return decide.yes_probability(
        self.sampler, self.tokenizer, [prompt_files.two_picture_prompt(template, t) for _, _, t in items],
        [(r, i) for r, i, _ in items], load=self.load, encode_cfg=self.encode_cfg, lengths=c.prompt_lengths,
        batch_size=c.batch_size, answer_words=c.answer_words, reasoning=c.verify_reasoning,
        max_new_tokens=c.describe_max_tokens)

  def decide_holistic(self, items: Sequence[tuple[str, str, str]]) -> decide.Decisions:
    """The verification's decisions per (reference, candidate, text): the verify template's, or with
    calibrate.verify_turns = 2 the two-turn conversation's (Picture 1 and the text, then Picture 2)."""
    if self.verify_turns is None:
      return self.decide(self.verify_template, items)
    c, turns = self.ccfg, self.verify_turns
    return decide.two_turn_yes_probability(
        self.sampler, self.tokenizer, [(turns.first(t), (r,)) for r, _, t in items],
        lambda k, answer: (turns.second(items[k][2], answer), items[k][:2]), load=self.load,
        encode_cfg=self.encode_cfg, lengths=c.prompt_lengths, batch_size=c.batch_size, answer_words=c.answer_words,
        max_new_tokens=c.describe_max_tokens)

  def verify(self, items: Sequence[tuple[str, str, str]], statements: Sequence[Sequence[str]]
             ) -> tuple[np.ndarray, np.ndarray, list[list[float]], list[dict]]:
    """(final P(yes), holistic P(yes), per-statement P(yes) lists, what F wrote) per item; the last is
    {"verify_text", "verify_statement_texts", "verify_no_marker"} (texts None with direct reasoning)."""
    holistic = self.decide_holistic(items)
    per_statement: list[list[float]] = [[] for _ in items]
    notes = [{"verify_text": t, "verify_statement_texts": [], "verify_no_marker": bool(m)}
             for t, m in zip(holistic.texts, holistic.no_marker)]
    if self.intent_template is not None:
      flat = [(k, (r, i, s)) for k, ((r, i, _), ss) in enumerate(zip(items, statements)) for s in ss]
      scores = self.decide(self.intent_template, [x for _, x in flat])
      for (k, _), p, t, m in zip(flat, scores.p_yes, scores.texts, scores.no_marker):
        per_statement[k].append(float(p))
        notes[k]["verify_statement_texts"].append(t)
        notes[k]["verify_no_marker"] |= bool(m)
    final = np.asarray([min([h, *ps]) for h, ps in zip(holistic.p_yes, per_statement)], np.float64)
    return final, holistic.p_yes, per_statement, notes


def _oracle_for(images: dict, records: list[dict]) -> Optional[Oracle]:
  """The world's oracle when every image the records use has a scene graph beside it, else None."""
  names = {n for r in records for n in (r["reference"], r["instance"])}
  if names and all(files.exists(files.path(images[n]).with_suffix(".json")) for n in names):
    return Oracle(images)
  return None


def _judge(oracle: Oracle, reference: str, text: str, instance: str) -> tuple[bool, bool]:
  """(rewrite correct, oracle could not read the text); an unreadable text counts as incorrect."""
  try:
    return bool(oracle.judge(reference, text, instance)), False
  except TextParseError:
    return False, True


def _parse(calibrator: Calibrator, raw: str, original: str) -> parse.ParseResult:
  if calibrator.oracle_rewriter is not None and not raw:
    return parse.ParseResult(text=None, reason=ORACLE_NO_EDIT)
  return parse.parse_rewrite(raw, original, calibrator.parse_mode)


def apply_filter(sample: dict, ccfg: ConfigDict) -> dict:
  """The sample with `vqa_pass` (P(yes) >= threshold) and `kept` (parsed, and passing when the filter is on) set
  from its recorded P(yes) under the current config."""
  passed = sample["p_yes"] is not None and sample["p_yes"] >= ccfg.vqa_threshold
  kept = sample["text"] is not None and (passed or not ccfg.vqa_filter)
  return {**sample, "vqa_pass": bool(passed), "kept": bool(kept)}


VERIFY_ERROR = "verify_error"  # the rewrite parsed, but verifying it raised (recorded in the sample's "error")


def _verify(calibrator: Calibrator, batch: list[dict], parsed: list, ok: list[int]):
  """(verified indices, calibrator.verify's outputs for them, {index: error}). When the batch raises, its samples
  are verified one at a time and a sample that still raises is rejected with its error: no single sample stops
  the stage (it would fail again on every resume)."""
  def verify(ks):
    return calibrator.verify([(batch[k]["reference"], batch[k]["instance"], parsed[k].text) for k in ks],
                             [parsed[k].statements for k in ks])
  try:
    return ok, verify(ok), {}
  except Exception as e:  # noqa: BLE001 -- any failure of one sample; retried alone below
    if len(ok) <= 1:
      return [], verify([]), {k: f"{type(e).__name__}: {e}" for k in ok}
  good, parts, errors = [], [], {}
  for k in ok:
    try:
      parts.append(verify([k]))
      good.append(k)
    except Exception as e:  # noqa: BLE001
      errors[k] = f"{type(e).__name__}: {e}"
  if not parts:
    return [], verify([]), errors
  final = np.concatenate([p[0] for p in parts])
  holistic = np.concatenate([np.asarray(p[1]) for p in parts])
  return good, (final, holistic, [x for p in parts for x in p[2]], [x for p in parts for x in p[3]]), errors


def calibrate_batch(calibrator: Calibrator, batch: list[dict], rng: Optional[jax.Array],
                    oracle: Optional[Oracle]) -> list[dict]:
  """The finished sample records of one batch of mined records; `oracle` (or None) judges the rewrites."""
  ccfg = calibrator.ccfg
  raws, new_tokens = calibrator.rewrite([(r["reference"], r["instance"], r["text"]) for r in batch], rng)
  parsed = [_parse(calibrator, raw, r["text"]) for raw, r in zip(raws, batch)]
  ok = [k for k, p in enumerate(parsed) if p.text is not None]
  ok, (final, holistic, per_statement, notes), errors = _verify(calibrator, batch, parsed, ok)
  for k, reason in errors.items():
    parsed[k] = parse.ParseResult(text=None, reason=VERIFY_ERROR, model_text=parsed[k].model_text)
  verified = {k: j for j, k in enumerate(ok)}
  out = []
  for k, (r, raw, p) in enumerate(zip(batch, raws, parsed)):
    j = verified.get(k)
    rec = {
        "id": r["id"], "qid": r["qid"], "dataset": r["dataset"], "split": r["split"], "category": r["category"],
        "reference": r["reference"], "instance": r["instance"], "group": r["group"],
        "original_text": r["text"], "original_captions": r["captions"], "original_targets": r["targets"],
        "instance_rank": r["instance_rank"], "gt_rank": r["gt_rank"],
        "instance_similarity": r["instance_similarity"], "gt_similarity": r["gt_similarity"],
        "prompt_mode": ccfg.prompt_mode, "rewriter": ccfg.rewriter, "raw_generation": raw,
        "new_tokens": int(new_tokens[k]),
        "hit_max_new_tokens": int(new_tokens[k]) >= ccfg.max_new_tokens,
        "parse_status": p.reason, "model_text": p.model_text, "text": p.text, "statements": list(p.statements),
        "p_yes": None if j is None else float(final[j]),
        "p_yes_holistic": None if j is None else float(holistic[j]),
        "p_yes_statements": None if j is None else per_statement[j],
        "verify_reasoning": ccfg.verify_reasoning, "verify_turns": ccfg.verify_turns,
        **(notes[j] if j is not None else {"verify_text": None, "verify_statement_texts": None,
                                           "verify_no_marker": None}),
        "oracle_correct": None, "oracle_unparseable": None, "error": errors.get(k),
    }
    if oracle is not None and p.text is not None:
      rec["oracle_correct"], rec["oracle_unparseable"] = _judge(oracle, r["reference"], p.text, r["instance"])
    out.append(apply_filter(rec, ccfg))
  return out


def read_partial(path: str, prompt_mode: str, rewriter: str = "model") -> dict[str, dict]:
  """Finished samples of an interrupted run, by id. A torn last line (a crash mid-write) is cut off the file so
  appending continues cleanly; a torn line elsewhere, or samples of another prompt mode or rewriter, are errors."""
  if not files.exists(path):
    return {}
  lines = io.StringIO(files.read_text(path)).readlines()
  done = {}
  for n, line in enumerate(lines):
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      if n != len(lines) - 1:
        raise ValueError(f"{path}: line {n + 1} is not valid JSON; delete the file to start Stage 3 afresh") from None
      log.warning("[calibrate] %s: dropping a torn last line (interrupted write)", path)
      artifacts.atomic_write_text(path, "".join(lines[:-1]))
      break
    if rec.get("prompt_mode") != prompt_mode:
      raise ValueError(f"{path}: sample {rec.get('id')} was generated with prompt mode {rec.get('prompt_mode')!r} "
                       f"but config calibrate.prompt_mode is {prompt_mode!r}; delete the file to start afresh")
    if rec.get("rewriter", "model") != rewriter:
      raise ValueError(f"{path}: sample {rec.get('id')} was written by rewriter {rec.get('rewriter', 'model')!r} "
                       f"but config calibrate.rewriter is {rewriter!r}; delete the file to start afresh")
    done[rec["id"]] = rec
  return done


def _read_partial_everywhere(path: str, ccfg: ConfigDict) -> dict[str, dict]:
  """`read_partial` on every process: process 0 first (it may cut a torn last line), the others once it has."""
  done = read_partial(path, ccfg.prompt_mode, ccfg.rewriter) if parallel.is_writer() else None
  parallel.barrier("calibrate.read_partial")
  return done if done is not None else read_partial(path, ccfg.prompt_mode, ccfg.rewriter)


def seed_partial(generations: str, out: str) -> str:
  """Starts the calibrate run writing to `out` from another run's finished generations.jsonl (same mined records,
  prompt mode and rewriter: checked on reading). Only the keep decision is made anew, under this run's config:
  e.g. the same generations with and without the VQA filter. Returns the partial file."""
  partial = os.path.join(out, PARTIAL)
  if files.exists(partial):
    raise FileExistsError(f"{partial} exists: this calibrate run has samples of its own")
  artifacts.atomic_write_text(partial, files.read_text(generations))
  return partial


def corrective_triplet(sample: dict) -> dict:
  """A kept sample as a training triplet (reference, new text, instance as the target), provenance included."""
  return {**sample, "captions": [sample["text"]], "targets": [sample["instance"]]}


def statistics(samples: list[dict], num_mined: int) -> dict:
  reasons = collections.Counter(s["parse_status"] for s in samples)
  parsed = reasons.pop(parse.OK, 0)
  kept = sum(s["kept"] for s in samples)
  stats = {
      "mined": num_mined, "generated": len(samples), "parsed": parsed, "rejected": sum(reasons.values()),
      "rejected_by_reason": dict(sorted(reasons.items())), "verified": parsed, "kept": kept,
      "dropped_by_vqa": parsed - kept, "keep_rate": kept / len(samples) if samples else 0.0,
      "below_vqa_threshold": sum(s["text"] is not None and not s["vqa_pass"] for s in samples),
      "hit_max_new_tokens": sum(s["hit_max_new_tokens"] for s in samples),
      # describe reasoning: verified samples whose description never reached "Answer:" (P(yes) = 0)
      "verify_no_marker": sum(bool(s.get("verify_no_marker")) for s in samples),
  }
  judged = [s for s in samples if s["oracle_correct"] is not None]
  if judged:
    kept_judged = [s for s in judged if s["kept"]]
    dropped_judged = [s for s in judged if not s["kept"]]
    stats["oracle"] = {
        "judged": len(judged), "rewrite_accuracy": float(np.mean([s["oracle_correct"] for s in judged])),
        "unparseable_by_oracle": sum(s["oracle_unparseable"] for s in judged),
        "vqa_agreement": float(np.mean([s["vqa_pass"] == s["oracle_correct"] for s in judged])),
        "precision_of_kept": (float(np.mean([s["oracle_correct"] for s in kept_judged])) if kept_judged else None),
        # How many of the triplets the VQA filter threw away were right after all (its false rejections).
        "precision_of_dropped": (float(np.mean([s["oracle_correct"] for s in dropped_judged]))
                                 if dropped_judged else None),
    }
  return stats


def _sheet(samples: list[dict], load, path: str, n: int) -> None:
  shown = [s for s in samples if s["text"] is not None][:n] or samples[:n]
  items = []
  for s in shown:
    new = s["text"] if s["text"] is not None else f"(rejected: {s['parse_status']}) {s['raw_generation'][:80]!r}"
    p = "-" if s["p_yes"] is None else f"{s['p_yes']:.3f}"
    seen = f"\nF: {s['verify_text'][:120]}" if s.get("verify_text") else ""  # describe reasoning: what F read
    text = f"original: {s['original_text']}\nnew: {new}\nP(yes) = {p}{seen}"
    items.append({"reference": s["reference"], "text": text,
                  "images": [(s["instance"], f"P(yes) {p}", "ok" if s["vqa_pass"] else "bad")]})
  if items:
    viz.triplet_sheet(items, load, path,
                      title="calibrated: reference, instance (green = passes the VQA threshold)")


def run(cfg: ConfigDict, workdir: str, out: str, *, model=None, tokenizer=None,
        sampler: Optional[Sampler] = None, round_num: int = 1, mesh=None) -> dict:
  """Calibrates the records of round `round_num`'s mine stage with the frozen foundation model (or the given model
  / sampler), decoding on `mesh` (default: the config's; a given model is placed on it, a given sampler keeps its
  own).

  With several processes, every batch of records is split across them: each process's devices decode their rows
  of the global batch (`Sampler(mesh=...)`) and every process gets all rows back, so all hold the same samples;
  process 0 writes them."""
  ccfg = cfg.calibrate
  mined_stage = artifacts.round_stage("mine", round_num)
  if not artifacts.is_done(workdir, mined_stage):
    raise FileNotFoundError(f"stage {mined_stage!r} has not finished in {workdir} (run --stages {mined_stage} first)")
  mined = artifacts.read_jsonl(os.path.join(artifacts.stage_dir(workdir, mined_stage), mine.MINED))
  records = mined[:ccfg.max_records] if ccfg.max_records else mined
  ids = collections.Counter(r["id"] for r in records)
  if len(ids) != len(records):
    raise ValueError(f"mined records have duplicate ids: {[i for i, c in ids.items() if c > 1][:5]}")
  splits = common.read_splits(cfg, workdir, cfg.mine.split)
  images = {name: path for s in splits for name, path in s.images.items()}  # the oracle finds scene graphs by path
  missing = sorted({n for r in records for n in (r["reference"], r["instance"])} - set(images))
  if missing:
    raise ValueError(f"mined images {missing[:5]} are not in the {cfg.mine.split} split of {cfg.data.dataset}")
  if sampler is None:
    mesh = mesh if mesh is not None else parallel.mesh_from_config(cfg)
    if model is None:
      model, tokenizer = common.load_base_model(cfg, workdir, common.foundation_checkpoint(cfg, workdir), mesh=mesh)
    else:
      common.place_model(model, cfg, mesh)
    sampler = Sampler(model, tokenizer, cache_buckets=ccfg.prompt_lengths, mesh=mesh)
  tokenizer = tokenizer or sampler.tokenizer
  world = _oracle_for(images, records) if ccfg.oracle or ccfg.rewriter == "oracle" else None
  load = data_source.image_loader(cfg, workdir, splits)
  calibrator = Calibrator(sampler, tokenizer, ccfg, common.encode_config(cfg), load, oracle=world)
  oracle = world if ccfg.oracle else None

  partial = os.path.join(out, PARTIAL)
  done = _read_partial_everywhere(partial, ccfg)
  position = {r["id"]: k for k, r in enumerate(records)}
  pending = [r for r in records if r["id"] not in done]
  log.info("[calibrate] %d records (%d mined): %d done before, %d to generate", len(records), len(mined),
           len(records) - len(pending), len(pending))
  progress = Progress(len(pending), unit="samples")
  base_key = jax.random.key(ccfg.seed)
  started = time.perf_counter()
  # Process 0 appends every finished batch; the others hold the same samples and write nothing (files.py).
  with files.Appender(partial) as f:
    for start in range(0, len(pending), ccfg.batch_size):
      batch = pending[start:start + ccfg.batch_size]
      # Keyed by the batch's first record, so a batch draws the same way whether or not the run was resumed.
      rng = None if calibrator.sampling.greedy else jax.random.fold_in(base_key, position[batch[0]["id"]])
      for rec in calibrate_batch(calibrator, batch, rng, oracle):
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        faults.point("calibrate.write")
      f.sync()
      log.info("[calibrate] %s", progress.line(start + len(batch)))
  seconds = time.perf_counter() - started  # rewrite + verify (+ oracle) of this run's samples, compiles included

  done = _read_partial_everywhere(partial, ccfg)
  samples = [apply_filter(done[r["id"]], ccfg) for r in records]
  artifacts.write_jsonl(os.path.join(out, GENERATIONS), samples)
  artifacts.write_jsonl(os.path.join(out, CORRECTIVE), [corrective_triplet(s) for s in samples if s["kept"]])
  sheet = os.path.join(out, SHEET)
  _sheet(samples, load, sheet, ccfg.sheet_samples)
  files.remove(partial)
  stats = statistics(samples, len(mined))
  log.info("[calibrate] %s", json.dumps({k: v for k, v in stats.items() if k != "oracle"}))
  return {
      "round": round_num, "mined_from": mined_stage,
      "prompt_mode": ccfg.prompt_mode, "prompt_dir": prompt_files.resolve_dir(ccfg.prompt_dir),
      "rewriter": ccfg.rewriter, "vqa_filter": bool(ccfg.vqa_filter),
      "max_records": ccfg.max_records, "vqa_threshold": ccfg.vqa_threshold, "answer_words": list(ccfg.answer_words),
      "answer_token_ids": calibrator.answer_ids, "decomposed_verification": bool(ccfg.decomposed_verification),
      "verify_reasoning": ccfg.verify_reasoning, "verify_turns": ccfg.verify_turns,
      "describe_max_tokens": ccfg.describe_max_tokens,
      "oracle": "scene graphs" if oracle is not None else "unavailable" if ccfg.oracle else "off",
      "statistics": stats,
      # This run's own samples (a resumed run times only what it generated): rewrite, verify, write.
      "throughput": {"samples": len(pending), "seconds": round(seconds, 2),
                     "samples_per_s": round(len(pending) / seconds, 3) if pending and seconds > 0 else None},
      "outputs": {"generations": os.path.join(out, GENERATIONS), "corrective": os.path.join(out, CORRECTIVE),
                  "sheet": sheet if files.exists(sheet) else None},
  }
