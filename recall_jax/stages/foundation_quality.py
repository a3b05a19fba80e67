"""The foundation model F's quality figures on the val split, against the synthetic world's oracle.

Measured on the configured dataset's val split (`common.read_splits(cfg, workdir, "val")`; FashionIQ: its three
category splits together), with every sample drawn from cfg.seed, at the counts of config teach.quality:
  vqa_accuracy            per image (up to vqa_images), one true and one false templated question, as the teach stage
                          builds them (sft._vqa_examples, teach.reasoning); decision P(yes) > 0.5;
  rewrite_parseable,      per query (up to rewrite_queries) that has an informative-instance stand-in
  rewrite_oracle_correct  (sft.informative_instance over its split's images), F's minimal-JSON rewrite
                          (calibrate.Calibrator.rewrite) read by parse.parse_rewrite and judged by the oracle (a text
                          it cannot read is incorrect); both are fractions of every attempted rewrite;
  verify_agreement,       per query (up to verify_queries), the four balanced verify items of the SFT data; decision
  verify_yes_rate         P(yes) >= calibrate.vqa_threshold, read as Stage 3 reads it (calibrate.verify_reasoning),
                          against oracle.judge;
  image_dependence        the std over up to 32 val images of P(yes) for "Is it red?" (teach.reasoning): ~0 when F
                          does not read the image at all.
P(yes) comes from `generate.decide` (direct, or describe then decide). Batch size, prompt lengths, max_new_tokens,
describe_max_tokens and sampling are calibrate's, so the figures describe the F that Stage 3 will use.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from recall_jax import parallel
from recall_jax.data import prompts
from recall_jax.generate import sft
from recall_jax.data.records import Query
from recall_jax.data.synthetic import language
from recall_jax.data.synthetic.oracle import Oracle
from recall_jax.generate import decide, parse
from recall_jax.generate.sampler import Sampler
from recall_jax.stages import calibrate, common, data_source

log = logging.getLogger("recall_jax")

PROBE_IMAGES = 32  # image_dependence
PROBE_QUESTION = language.question("colour", "red")
EXAMPLES = 3  # of each kind, for the manifest
# Independent draws per figure: changing one count leaves the others' samples alone.
VQA_IMAGES, VQA_QUESTIONS, REWRITES, VERIFIES, PROBES = range(5)


def _draw(total: int, n: int, seed: int, stream: int) -> list[int]:
  """Up to n distinct indices of range(total), drawn from (seed, stream), in increasing order."""
  return sorted(np.random.default_rng([seed, stream]).permutation(total)[:max(n, 0)].tolist())


def _fraction(flags: Sequence[bool]) -> Optional[float]:
  return float(np.mean(flags)) if len(flags) else None


def _with_instances(oracle: Oracle, chosen: Sequence[tuple[Query, list[str]]],
                    caption_join: str) -> list[tuple[Query, str, str]]:
  """(query, informative-instance stand-in, original text) for the chosen queries that have one."""
  out = []
  for q, pool in chosen:
    text = prompts.join_captions(q.captions, caption_join)
    instance = sft.informative_instance(oracle, q, text, pool)
    if instance is not None:
      out.append((q, instance, text))
  return out


def _vqa(oracle: Oracle, names: list[str], ask, n: int, seed: int, reasoning: str) -> tuple[dict, dict]:
  chosen = [names[i] for i in _draw(len(names), n, seed, VQA_IMAGES)]
  rng = np.random.default_rng([seed, VQA_QUESTIONS])
  examples = [e for name in chosen for e in sft._vqa_examples(oracle, name, rng, 1, reasoning)]
  truth = np.asarray([e.answer.rsplit(" ", 1)[-1] == "yes" for e in examples], bool)  # "yes" / "... Answer: yes"
  d = ask([e.prompt for e in examples], [e.images for e in examples])
  return ({"vqa_accuracy": _fraction((d.p_yes > 0.5) == truth), "vqa_no_marker": int(d.no_marker.sum())},
          {"vqa_images": len(chosen), "vqa_questions": len(examples)})


def _rewrites(calibrator: calibrate.Calibrator, oracle: Oracle, queries: list, n: int, seed: int,
              caption_join: str) -> tuple[dict, dict, list[dict]]:
  chosen = [queries[i] for i in _draw(len(queries), n, seed, REWRITES)]
  items = _with_instances(oracle, chosen, caption_join)
  ccfg, raws = calibrator.ccfg, []
  key = jax.random.key(ccfg.seed)
  for b, start in enumerate(range(0, len(items), ccfg.batch_size)):
    chunk = items[start:start + ccfg.batch_size]
    rng = None if calibrator.sampling.greedy else jax.random.fold_in(key, b)
    raws += calibrator.rewrite([(q.reference, instance, text) for q, instance, text in chunk], rng)[0]
  parsed = [parse.parse_rewrite(raw, text, ccfg.prompt_mode) for raw, (_, _, text) in zip(raws, items)]
  correct = [p.text is not None and calibrate._judge(oracle, q.reference, p.text, instance)[0]
             for p, (q, instance, _) in zip(parsed, items)]
  examples = [{"qid": q.qid, "reference": q.reference, "instance": instance, "original_text": text,
               "raw_generation": raw, "parse_status": p.reason, "text": p.text, "oracle_correct": bool(c)}
              for (q, instance, text), raw, p, c in list(zip(items, raws, parsed, correct))[:EXAMPLES]]
  return ({"rewrite_parseable": _fraction([p.text is not None for p in parsed]),
           "rewrite_oracle_correct": _fraction(correct)},
          {"rewrite_queries": len(chosen), "rewrite_attempted": len(items)}, examples)


def _verifies(calibrator: calibrate.Calibrator, oracle: Oracle, queries: list, n: int, seed: int,
              caption_join: str) -> tuple[dict, dict, list[dict]]:
  """The SFT data's balanced verify items: (target, original) yes, (instance, original) no, (instance, oracle
  rewrite) yes, (target, oracle rewrite) no (as judged by the oracle, which is the label)."""
  chosen = [queries[i] for i in _draw(len(queries), n, seed, VERIFIES)]
  items, truth, used = [], [], 0
  for q, instance, text in _with_instances(oracle, chosen, caption_join):
    try:
      new = sft.closest_edit(oracle, q.reference, instance, text)
    except ValueError:  # no edit the world's language can state
      continue
    used += 1
    for candidate, t in ((q.target, text), (instance, text), (instance, new), (q.target, new)):
      items.append((q.reference, candidate, t))
      truth.append(oracle.judge(q.reference, t, candidate))
  d = calibrator.decide_holistic(items)
  yes = d.p_yes >= calibrator.ccfg.vqa_threshold
  examples = [{"reference": r, "candidate": c, "text": t, "oracle": bool(o), "p_yes": float(p), "verify_text": w}
              for (r, c, t), o, p, w in list(zip(items, truth, d.p_yes, d.texts))[:EXAMPLES]]
  return ({"verify_agreement": _fraction(yes == np.asarray(truth, bool)), "verify_yes_rate": _fraction(yes),
           "verify_no_marker": int(d.no_marker.sum())},
          {"verify_queries": len(chosen), "verify_queries_used": used, "verify_items": len(items)}, examples)


def _image_dependence(names: list[str], ask, seed: int) -> tuple[dict, dict]:
  chosen = [names[i] for i in _draw(len(names), PROBE_IMAGES, seed, PROBES)]
  d = ask([sft.question_prompt(PROBE_QUESTION)] * len(chosen), [(n,) for n in chosen])
  return ({"image_dependence": float(np.std(d.p_yes)) if chosen else None,
           "image_dependence_mean_p_yes": float(np.mean(d.p_yes)) if chosen else None},
          {"image_dependence_images": len(chosen)})


def evaluate_foundation(model: Any, tokenizer: Any, cfg: ConfigDict, workdir: str, *,
                        sampler: Optional[Sampler] = None, split: str = "val", mesh=None) -> dict:
  """F's quality figures (module doc) on `split` (the val split; the teach test also reads train) of
  cfg.data.dataset; `sampler` replaces the one built from (model, tokenizer) as calibrate.run builds it: the model
  placed on `mesh` (default: the config's) and the batches sharded over it."""
  started = time.perf_counter()
  ccfg, qcfg, reasoning = cfg.calibrate, cfg.teach.quality, cfg.teach.reasoning
  splits = common.read_splits(cfg, workdir, split)
  images = {name: path for s in splits for name, path in s.images.items()}
  oracle = Oracle(images)
  if sampler is None:
    # Weights left on the host or on another layout (teach's trained copies) would otherwise make each decode step
    # a multi-device program beside host inputs, which on 8 CPU host devices never finished.
    mesh = mesh if mesh is not None else parallel.mesh_from_config(cfg)
    common.place_model(model, cfg, mesh)
    sampler = Sampler(model, tokenizer, cache_buckets=ccfg.prompt_lengths, mesh=mesh)
  tokenizer = tokenizer or sampler.tokenizer
  load, encode_cfg = data_source.image_loader(cfg, workdir, splits), common.encode_config(cfg)
  rewrite_cfg = ccfg.copy_and_resolve_references()
  rewrite_cfg.rewriter = "model"  # F's own rewrites, in Stage 3's prompt mode (the one the teach stage trains)
  calibrator = calibrate.Calibrator(sampler, tokenizer, rewrite_cfg, encode_cfg, load)
  ask = functools.partial(decide.yes_probability, sampler, tokenizer, load=load, encode_cfg=encode_cfg,
                          lengths=ccfg.prompt_lengths, batch_size=ccfg.batch_size, answer_words=ccfg.answer_words,
                          reasoning=reasoning, max_new_tokens=ccfg.describe_max_tokens)
  if reasoning != ccfg.verify_reasoning:
    log.warning("[quality] teach.reasoning = %r but calibrate.verify_reasoning = %r: verify_agreement reads F as "
                "Stage 3 will, not as it was taught", reasoning, ccfg.verify_reasoning)
  names = sorted(images)
  queries = [(q, sorted(s.images)) for s in splits for q in s.queries if q.target is not None]
  join = cfg.data.caption_join

  figures, counts = _vqa(oracle, names, ask, qcfg.vqa_images, cfg.seed, reasoning)
  rewrite_figures, rewrite_counts, rewrite_examples = _rewrites(calibrator, oracle, queries, qcfg.rewrite_queries,
                                                                cfg.seed, join)
  verify_figures, verify_counts, verify_examples = _verifies(calibrator, oracle, queries, qcfg.verify_queries,
                                                             cfg.seed, join)
  probe_figures, probe_counts = _image_dependence(names, ask, cfg.seed)
  figures = {**figures, **rewrite_figures, **verify_figures, **probe_figures}
  result = {
      "dataset": cfg.data.dataset, "split": "val", "reasoning": {"vqa": reasoning, "verify": ccfg.verify_reasoning},
      "vqa_threshold": ccfg.vqa_threshold, **figures,
      "counts": {**counts, **rewrite_counts, **verify_counts, **probe_counts},
      "examples": {"rewrites": rewrite_examples, "verify": verify_examples},
      "seconds": round(time.perf_counter() - started, 1),
  }
  log.info("[quality] %s", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()})
  return result
