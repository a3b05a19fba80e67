"""Stage 0 on the embedded default: generate the synthetic world and, when no base checkpoint is configured, a tiny
random Qwen2.5-VL checkpoint (config.json + model.safetensors + tokenizer) written in the Hugging Face layout.
With config data.format "array_record", it also writes the configured dataset (the world's layout, or data.root)
as ArrayRecord files into `paths.array_record_dir` (stages/data_source.py).

The tiny checkpoint's tokenizer (config model.tiny_tokenizer): "world" trains a byte-level BPE on the world's
training text (`world_tokenizer`; needs the synthetic world), "bytes" is the fixed 512-id byte-level one."""

from __future__ import annotations

import jax
from flax import nnx
from ml_collections import ConfigDict

from recall_jax import files, parallel
from recall_jax.data.synthetic import generate_world
from recall_jax.models import family, tokenizers
from recall_jax.stages.tokenizer_corpus import world_corpus
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import build_tiny_tokenizer
from recall_jax.models.qwen2_5_vl.world_tokenizer import build_world_tokenizer
from recall_jax.stages import data_source
from recall_jax.stages.paths import checkpoint_dir, world_root

TOKENIZERS = ("world", "bytes")


def _tiny_tokenizer(cfg: ConfigDict, workdir: str, vocab_size: int):
  kind = cfg.model.tiny_tokenizer
  if kind not in TOKENIZERS:
    raise ValueError(f"config model.tiny_tokenizer must be one of {TOKENIZERS}, got {kind!r}")
  if kind == "bytes":
    tokenizer = build_tiny_tokenizer()
  else:
    if cfg.data.root:
      raise ValueError("config model.tiny_tokenizer='world' trains on the synthetic world; with a real data.root "
                       "use model.tiny_tokenizer='bytes' (or a real checkpoint)")
    corpus = world_corpus(world_root(cfg, workdir), prompt_dir=cfg.calibrate.prompt_dir,
                          prompt_mode=cfg.calibrate.prompt_mode, reasoning=cfg.teach.reasoning,
                          verify_turns=cfg.calibrate.verify_turns,
                          caption_join=cfg.data.caption_join, seed=cfg.world.seed)
    tokenizer = build_world_tokenizer(corpus, vocab_size)
  if len(tokenizer) > vocab_size:
    raise ValueError(f"the {kind} tokenizer has {len(tokenizer)} ids but config model.tiny.text.vocab_size is "
                     f"{vocab_size}")
  return tokenizer


def run(cfg: ConfigDict, workdir: str, out: str) -> dict:
  """Writes the world, the tiny checkpoint and the ArrayRecord files; process 0 alone (the others wait for it at
  the stage's barrier and read its manifest)."""
  manifest: dict = {}
  if not parallel.is_writer():
    return manifest
  if world_root(cfg, workdir) != cfg.data.root:  # data.root "" -> generate the synthetic world
    root = world_root(cfg, workdir)
    if files.exists(root):  # a crash mid-generation leaves a partial world: start it again
      files.rmtree(root)
    world = generate_world(root, scale=cfg.world.scale, seed=cfg.world.seed, image_size=cfg.world.image_size)
    manifest["world"] = {"root": root, "counts": world["counts"]}
  if checkpoint_dir(cfg, workdir) != cfg.model.checkpoint:  # model.checkpoint "" -> a tiny random checkpoint
    path = checkpoint_dir(cfg, workdir)
    fam = family.get(cfg.model.family)
    model_cfg = fam.tiny_config(**cfg.model.tiny.to_dict())
    tokenizer = _tiny_tokenizer(cfg, workdir, model_cfg.text.vocab_size)
    model = fam.model_cls(model_cfg, rngs=nnx.Rngs(cfg.model.init_seed))
    fam.save_pretrained(model, path)
    tokenizers.save_tokenizer(tokenizer, path)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    manifest["checkpoint"] = {"path": path, "family": fam.name, "params": int(n),
                              "random_init_seed": cfg.model.init_seed,
                              "tokenizer": cfg.model.tiny_tokenizer, "vocab_size": len(tokenizer),
                              "text": dict(hidden_size=model_cfg.text.hidden_size,
                                           layers=model_cfg.text.num_hidden_layers),
                              "vision": dict(hidden_size=model_cfg.vision.hidden_size, depth=model_cfg.vision.depth)}
  if data_source.data_format(cfg) == "array_record":
    manifest["array_record"] = data_source.write_array_record(cfg, workdir)
  return manifest
