"""Optional stage "teach": fine-tune the foundation model on the synthetic world (the generative objective), so that
Stage 3 has a model that can read the world: captions, yes/no questions, the rewrite and the verification prompts
(recall_jax.data.sft, built from the training split's scene graphs).

Two ways to train, by config:
  teach.trainable_regex = ""       LoRA on teach.lora.target_regex (rank teach.lora.rank), merged into the base at the
                                   end: the choice for a real 7B model (memory);
  teach.trainable_regex = "<re>"   full fine-tuning of the parameters whose path matches (".*" = all): the choice for
                                   the demo's tiny random model, which has nothing for a low-rank update to adapt
                                   (its embeddings, norms and lm_head must move too) and costs little to train fully.
The result is saved in the Hugging Face layout (save_pretrained + the tokenizer) to <workdir>/teach/checkpoint;
`common.foundation_checkpoint` hands it to the calibrate stage when this stage has finished. Training checkpoints
(Orbax) make an interrupted run resume.
"""

from __future__ import annotations

import collections
import logging
import os

import jax
from flax import nnx
from ml_collections import ConfigDict

from recall_jax import parallel
from recall_jax.data import pipeline, sft
from recall_jax.models import lora, qwen2_5_vl
from recall_jax.stages import common
from recall_jax.train import generative, trainer

log = logging.getLogger("recall_jax")

CHECKPOINT = "checkpoint"


def sft_config(cfg: ConfigDict) -> sft.SFTConfig:
  t = cfg.teach
  return sft.SFTConfig(lengths=tuple(t.lengths), batch_size=t.batch_size, tasks=tuple(t.tasks),
                       prompt_dir=cfg.calibrate.prompt_dir, caption_join=cfg.data.caption_join)


def trainable(model, cfg: ConfigDict):
  """The nnx filter of the trained parameters; attaches the LoRA adapters first in LoRA mode."""
  t = cfg.teach
  if t.trainable_regex:
    return generative.params_matching(t.trainable_regex)
  names = lora.apply_lora(model, t.lora.target_regex, rank=t.lora.rank, alpha=t.lora.alpha, dropout=t.lora.dropout,
                          init=t.lora.init, rngs=nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1))
  log.info("[teach] LoRA on %d modules (rank %d, alpha %g)", len(names), t.lora.rank, t.lora.alpha)
  return nnx.LoRAParam


def _loop_config(t: ConfigDict) -> ConfigDict:
  return ConfigDict({"steps": t.steps, "log_every": t.log_every, "checkpoint_every": t.checkpoint_every,
                     "eval_every": t.steps, "keep_checkpoints": t.keep_checkpoints, "best_metric": "",
                     "data_threads": t.data_threads, "data_workers": 0})


def run(cfg: ConfigDict, workdir: str, out: str) -> dict:
  t = cfg.teach
  splits = common.read_splits(cfg, workdir, "train")
  queries = [q for s in splits for q in s.queries]
  images: dict[str, str] = {}
  for s in splits:
    images.update(s.images)
  scfg = sft_config(cfg)
  examples = sft.build_examples(queries, images, scfg, seed=cfg.seed)
  tasks = dict(collections.Counter(e.task for e in examples))
  log.info("[teach] %d SFT examples from %d training triplets: %s", len(examples), len(queries), tasks)

  model, tokenizer = common.load_base_model(cfg, workdir)
  params = trainable(model, cfg)
  ds = sft.sft_dataset(examples, load=pipeline.FileImages(images), tokenizer=tokenizer,
                       encode_cfg=common.encode_config(cfg), cfg=scfg, seed=cfg.seed)
  objective = trainer.Objective(
      trainable=params, dataset=ds,
      host_batch=lambda batch, step: generative.host_batch(model.cfg, batch, step_seed=cfg.seed * 7919 + step),
      make_step=generative.make_train_step)
  result = trainer.fit(model, objective, train_cfg=_loop_config(t), optim_cfg=t.optim, seed=cfg.seed, out_dir=out,
                       mesh=parallel.make_mesh(tuple(cfg.mesh.shape)))
  if result.steps != t.steps:
    raise RuntimeError(f"[teach] training stopped at step {result.steps} of {t.steps}")
  # The trained params come back replicated over the mesh; host copies let merge and save run beside the base.
  nnx.update(model, jax.device_get(nnx.state(model, params)))
  if not t.trainable_regex:
    lora.merge_lora(model)
  path = os.path.join(out, CHECKPOINT)
  if jax.process_index() == 0:
    qwen2_5_vl.save_pretrained(model, path)
    tokenizer.save_pretrained(path)
  return {"checkpoint": path, "mode": f"full fine-tuning of /{t.trainable_regex}/" if t.trainable_regex else
          f"LoRA rank {t.lora.rank} on /{t.lora.target_regex}/, merged", "steps": result.steps,
          "examples": len(examples), "examples_by_task": tasks, "last_train_metrics": result.last_metrics}
