"""Stage "teach": teach the foundation model F the synthetic world, so that Stage 3 has a model that can read it.

Two phases, both on the training split's scene graphs (never val / test):
  1. vision (teach.vision.steps > 0): the vision tower learns to classify every image's attributes
     (`train.vision_pretrain`): the tiny random tower reads nothing, and a yes/no fine-tuning of a blind tower
     teaches the LLM to ignore the image. Beside the training split's images it can see teach.vision.fresh_images
     new renders of the world's generator (`data.synthetic.fresh`, training combinations only): on ~1,900 images
     alone the tower memorises them (held-out train images, 1,000 steps: category 0.75, neckline 0.49);
  2. generative fine-tuning on captions, yes/no questions, the rewrite and the verification prompts
     (recall_jax.generate.sft; teach.reasoning = "describe": the answers put what the pictures show into words before
     deciding).
Then F's quality is measured on the val split against the oracle (`foundation_quality`: yes/no VQA accuracy,
parseable and oracle-correct rewrites, verification agreement at the calibrate threshold, image dependence) and
recorded in the manifest (`quality`), which the report shows.

Two ways to train, by config:
  teach.trainable_regex = ""       LoRA on teach.lora.target_regex (rank teach.lora.rank), merged into the base at the
                                   end: the choice for a real 7B model (memory);
  teach.trainable_regex = "<re>"   full fine-tuning of the parameters whose path matches (".*" = all): the choice for
                                   the demo's tiny random model, which has nothing for a low-rank update to adapt
                                   (its embeddings, norms and lm_head must move too) and costs little to train fully.
With config teach.cache_dir, a finished teach is stored there and reused by any later run (any workdir) with the
same recipe, world, base and code (`teach_cache`). The result is saved in the Hugging Face layout (save_pretrained + the tokenizer) to <workdir>/teach/checkpoint;
`common.foundation_checkpoint` hands it to the later stages when this stage has finished (the retriever starts from
F, as in the paper). Resuming: the vision phase's model is saved to <workdir>/teach/vision (HF layout) and reused;
the fine-tuning resumes from its Orbax checkpoints.
"""

from __future__ import annotations

import collections
import json
import logging
import os

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from recall_jax import files, parallel
from recall_jax.data import pipeline
from recall_jax.generate import sft
from recall_jax.data.synthetic import fresh
from recall_jax.data.synthetic.attributes import ATTRIBUTES, CATEGORIES, VALUES
from recall_jax.data.synthetic.oracle import Oracle
from recall_jax.models import family, lora, tokenizers
from recall_jax.stages import artifacts, common, data_source, paths, teach_cache
from recall_jax.train import generative, settings, trainer, vision_pretrain

log = logging.getLogger("recall_jax")

CHECKPOINT = "checkpoint"
VISION = "vision"
VISION_ATTRIBUTES = ("category",) + ATTRIBUTES


def sft_config(cfg: ConfigDict) -> sft.SFTConfig:
  t = cfg.teach
  return sft.SFTConfig(lengths=tuple(t.lengths), batch_size=t.batch_size, tasks=tuple(t.tasks),
                       prompt_dir=cfg.calibrate.prompt_dir, caption_join=cfg.data.caption_join,
                       reasoning=t.reasoning, vqa_pairs=t.vqa_pairs, prompt_mode=cfg.calibrate.prompt_mode,
                       repeats=tuple((task, int(k)) for task, k in t.repeats.items()),
                       decision_weight=float(t.decision_weight), verify_turns=int(cfg.calibrate.verify_turns))


_VALUES = {"category": CATEGORIES, **VALUES}


def _encoded(images: list, garments: list, cfg: ConfigDict):
  """(pixels (N, P, D) without bucket padding, the shared grid, labels (N, A)) of images with their garments."""
  pixels, grids = pipeline.encode_images(images, common.encode_config(cfg))
  if not np.all(grids == grids[:1]):
    raise ValueError("vision pretraining needs one image bucket (config data.image_buckets)")
  keys = list(range(len(garments)))
  labels = vision_pretrain.labels_for(dict(zip(keys, garments)), keys, VISION_ATTRIBUTES, _VALUES)
  return pixels[:, :int(np.prod(grids[0]))], tuple(int(g) for g in grids[0]), labels


def _image_arrays(splits: list, names: list[str], cfg: ConfigDict, workdir: str):
  """_encoded of `names` of `splits`, labelled from their scene graphs."""
  oracle = Oracle({name: path for s in splits for name, path in s.images.items()})
  load = data_source.image_loader(cfg, workdir, splits)
  return _encoded([load(n) for n in names], [oracle.garment(n) for n in names], cfg)


def _fresh_arrays(cfg: ConfigDict, n: int, fmt: str):
  """_encoded of n fresh renders of the world's generator (teach.vision.fresh_images), drawn from (world seed, teach
  seed): training combinations only."""
  images, garments = fresh.render_fresh(n, seed=(cfg.world.seed, cfg.seed), image_size=cfg.world.image_size, fmt=fmt)
  return _encoded(images, garments, cfg)


def teach_vision(model, cfg: ConfigDict, workdir: str, out: str, train_splits: list) -> dict:
  """Phase 1, resumable: trains model.visual on the training images' attributes, or reloads a finished phase."""
  v = cfg.teach.vision
  path = os.path.join(out, VISION)
  figures_path = os.path.join(path, "vision_pretrain.json")
  if files.exists(figures_path):
    nnx.update(model.visual, nnx.state(family.of_model(model).from_pretrained(path).visual, nnx.Param))
    log.info("[teach] vision phase done already (%s); reusing it", path)
    return json.loads(files.read_text(figures_path))
  names = sorted({n for s in train_splits for n in s.images})
  pixels, grid, labels = _image_arrays(train_splits, names, cfg, workdir)
  if v.fresh_images:
    fmt = os.path.splitext(train_splits[0].images[names[0]])[1].lstrip(".").lower()
    more, _, more_labels = _fresh_arrays(cfg, v.fresh_images, "jpg" if fmt == "jpeg" else fmt)  # same bucket
    pixels, labels = np.concatenate([pixels, more]), np.concatenate([labels, more_labels])
  val_splits = common.read_splits(cfg, workdir, "val")
  val_names = sorted({n for s in val_splits for n in s.images})[:v.val_images]
  val = _image_arrays(val_splits, val_names, cfg, workdir) if val_names else None
  vcfg = vision_pretrain.VisionPretrainConfig(steps=v.steps, batch_size=v.batch_size, lr=v.lr, log_every=v.log_every,
                                              seed=cfg.seed)
  log.info("[teach] vision phase: %d training images + %d fresh renders, %d steps of %d", len(names),
           v.fresh_images, v.steps, v.batch_size)
  figures = vision_pretrain.pretrain_vision(model, pixels, grid, labels,
                                            [len(CATEGORIES if a == "category" else VALUES[a])
                                             for a in VISION_ATTRIBUTES], vcfg,
                                            val=None if val is None else (val[0], val[2]))
  if "val_accuracy" in figures:
    figures["val_accuracy"] = dict(zip(VISION_ATTRIBUTES, figures["val_accuracy"]))
    log.info("[teach] vision val accuracy: %s", " ".join(f"{a}={x:.2f}" for a, x in figures["val_accuracy"].items()))
  figures["images"], figures["fresh_images"] = len(names), v.fresh_images
  if parallel.is_writer():
    family.of_model(model).save_pretrained(model, path)
    artifacts.atomic_write_json(figures_path, figures)
  return figures


def trainable(model, cfg: ConfigDict):
  """The nnx filter of the trained parameters; attaches the LoRA adapters first in LoRA mode."""
  t = cfg.teach
  if t.trainable_regex:
    return generative.params_matching(t.trainable_regex)
  names = lora.apply_lora(model, t.lora.target_regex, rank=t.lora.rank, alpha=t.lora.alpha, dropout=t.lora.dropout,
                          init=t.lora.init, rngs=nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1))
  log.info("[teach] LoRA on %d modules (rank %d, alpha %g)", len(names), t.lora.rank, t.lora.alpha)
  return nnx.LoRAParam


def image_probe(cfg: ConfigDict, workdir: str, tokenizer):
  """model -> the image dependence of F's P(yes) (and its mean) on a few val images, logged during teaching (the
  first probe's model learned to ignore the image first); nothing is selected by it."""
  from recall_jax.stages import foundation_quality
  probe_cfg = cfg.copy_and_resolve_references()
  probe_cfg.teach.quality.update({"vqa_images": 0, "rewrite_queries": 0, "verify_queries": 0})

  def probe(model) -> dict[str, float]:
    q = foundation_quality.evaluate_foundation(model, tokenizer, probe_cfg, workdir)
    return {"image_dependence": q["image_dependence"], "mean_p_yes": q["image_dependence_mean_p_yes"]}

  return probe


def run(cfg: ConfigDict, workdir: str, out: str, *, mesh=None) -> dict:
  """Teaches F on `mesh` (default: the config's); process 0 saves it."""
  mesh = mesh if mesh is not None else parallel.mesh_from_config(cfg)
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.seed = cfg.teach.seed  # every draw below (and in vision pretraining and the quality check) is teach's own
  t = cfg.teach
  cache_key = teach_cache.key(cfg, workdir) if t.cache_dir else None
  if cache_key and (reused := teach_cache.restore(t.cache_dir, cache_key, out)) is not None:
    return reused
  splits = common.read_splits(cfg, workdir, "train")
  queries = [q for s in splits for q in s.queries]
  images: dict[str, str] = {}
  for s in splits:
    images.update(s.images)
  scfg = sft_config(cfg)
  examples = sft.build_examples(queries, images, scfg, seed=cfg.seed)
  tasks = dict(collections.Counter(e.task for e in examples))
  log.info("[teach] %d SFT examples from %d training triplets: %s", len(examples), len(queries), tasks)

  # The base before teaching (teach's own checkpoint would be F once this stage has finished).
  model, tokenizer = common.load_base_model(cfg, workdir, paths.checkpoint_dir(cfg, workdir), mesh=mesh)
  vision = teach_vision(model, cfg, workdir, out, splits) if t.vision.steps else None
  params = trainable(model, cfg)
  ds = sft.sft_dataset(examples, load=data_source.image_loader(cfg, workdir, splits), tokenizer=tokenizer,
                       encode_cfg=common.encode_config(cfg), cfg=scfg, seed=cfg.seed)
  objective = trainer.Objective(
      trainable=params, dataset=ds,
      host_batch=lambda batch: generative.host_batch(model.cfg, batch),
      make_step=generative.make_train_step)
  result = trainer.fit(model, objective, loop=settings.teach_loop(t), optim=settings.optimizer(t.optim),
                       seed=cfg.seed, out_dir=out, mesh=mesh, sharding_rules=parallel.rules_from_config(cfg),
                       eval_fn=image_probe(cfg, workdir, tokenizer) if t.probe_every else None)
  if result.steps != t.steps:
    raise RuntimeError(f"[teach] training stopped at step {result.steps} of {t.steps}")
  # The trained params come back replicated over the mesh; host copies let merge and save run beside the base.
  nnx.update(model, jax.device_get(nnx.state(model, params)))
  if not t.trainable_regex:
    lora.merge_lora(model)
  path = os.path.join(out, CHECKPOINT)
  if parallel.is_writer():
    family.of_model(model).save_pretrained(model, path)
    tokenizers.save_tokenizer(tokenizer, path)
  quality = None
  if t.quality.enabled:
    from recall_jax.stages import foundation_quality
    quality = foundation_quality.evaluate_foundation(model, tokenizer, cfg, workdir, mesh=mesh)
    log.info("[teach] F on val: %s", json.dumps({k: v for k, v in quality.items() if isinstance(v, float)}))
  figures = {"checkpoint": path, "mode": f"full fine-tuning of /{t.trainable_regex}/" if t.trainable_regex else
             f"LoRA rank {t.lora.rank} on /{t.lora.target_regex}/, merged", "steps": result.steps,
             "reasoning": t.reasoning, "vision": vision, "quality": quality,
             "examples": len(examples), "examples_by_task": tasks, "last_train_metrics": result.last_metrics}
  if cache_key and parallel.is_writer():
    teach_cache.store(t.cache_dir, cache_key, out, figures)
  return figures
