"""What several stages share: the model and tokenizer from the config, the encode settings, the dataset splits."""

from __future__ import annotations


from flax import nnx
from ml_collections import ConfigDict

from recall_jax import files, parallel, recall_config
from recall_jax.data import pipeline
from recall_jax.data.image import ImageBuckets
from recall_jax.data.records import CIRSplit
from recall_jax.eval import retrieval
from recall_jax.models import family, tokenizers
from recall_jax.models.dtypes import DTYPES
from recall_jax.stages import data_source, paths


def load_base_model(cfg: ConfigDict, workdir: str, checkpoint: str | None = None, *, mesh=None):
  """(model, tokenizer) from the base checkpoint (`foundation_checkpoint`: teach's when it has finished, else the
  configured or prepare's tiny one), or from `checkpoint` when given. Every tensor is read once and placed straight
  onto its sharding on `mesh` (default: the config's, `parallel.mesh_from_config`) by config sharding.rules
  (replicated where none matches)."""
  if cfg.model.dtype not in DTYPES:
    raise ValueError(f"config model.dtype must be one of {sorted(DTYPES)}, got {cfg.model.dtype!r}")
  path = checkpoint or foundation_checkpoint(cfg, workdir)
  fam = family.of_checkpoint(path, expected=cfg.model.family)
  model = fam.from_pretrained(path, dtype=DTYPES[cfg.model.dtype], mesh=_mesh(cfg, mesh),
                              shardings=parallel.rules_from_config(cfg) or None,
                              position_mode=cfg.model.position_mode, remat=cfg.model.remat)
  if model.cfg.vision.patch_size != fam.patch_size:
    raise ValueError(f"{path}/config.json: vision patch_size {model.cfg.vision.patch_size}, but the {fam.name} "
                     f"image preprocessing here uses {fam.patch_size}")
  return model, tokenizers.load_tokenizer(path)


def _mesh(cfg: ConfigDict, mesh):
  return mesh if mesh is not None else parallel.mesh_from_config(cfg)


def place_model(model, cfg: ConfigDict, mesh=None):
  """Puts every weight of `model` (merged adapters included) back on the mesh by config sharding.rules."""
  nnx.update(model, parallel.place_params(nnx.state(model), _mesh(cfg, mesh), parallel.rules_from_config(cfg)))
  return model


def foundation_checkpoint(cfg: ConfigDict, workdir: str) -> str:
  """The foundation model F: the teach stage's fine-tuned checkpoint when that stage has finished, else the base
  checkpoint (config model.checkpoint, or prepare's tiny one). Stage 3 generates with it, and the retriever is
  initialised from it (adapt, mine, refine, evaluate), as R_base is from F in the paper."""
  from recall_jax.stages import artifacts
  if artifacts.is_done(workdir, "teach"):
    return artifacts.read_manifest(workdir, "teach")["checkpoint"]
  return paths.checkpoint_dir(cfg, workdir)


def round_start_stage(round_num: int) -> str:
  """The training stage whose adapters round `round_num` mines with and refines from: adapt for round 1, the
  previous round's refine after that."""
  from recall_jax.stages import artifacts
  return "adapt" if round_num == 1 else artifacts.round_stage("refine", round_num - 1)


def finished_rounds(cfg: ConfigDict, workdir: str) -> list[int]:
  """The rounds 1..config rounds whose refine has finished."""
  from recall_jax.stages import artifacts
  return [r for r in range(1, cfg.rounds + 1) if artifacts.is_done(workdir, artifacts.round_stage("refine", r))]


def latest_adapters(cfg: ConfigDict, workdir: str) -> str | None:
  """The training stage (name) with the most advanced finished adapters: the last round's refine that finished
  (up to config rounds), then adapt; None before Stage 1."""
  from recall_jax.stages import artifacts
  done = finished_rounds(cfg, workdir)
  if done:
    return artifacts.round_stage("refine", done[-1])
  return "adapt" if artifacts.is_done(workdir, "adapt") else None


def trained_adapters(cfg: ConfigDict, workdir: str, stage: str) -> str:
  """The adapter dir of a finished training stage, checked against the base they go on: adapters trained on one
  base (e.g. prepare's) must not be merged into another (teach's, when teach finished later)."""
  from recall_jax.stages import artifacts
  manifest = artifacts.read_manifest(workdir, stage)
  base, trained_on = foundation_checkpoint(cfg, workdir), manifest.get("base_checkpoint")
  if trained_on is not None and files.absolute(trained_on) != files.absolute(base):
    raise ValueError(f"the adapters of stage {stage!r} ({manifest['adapter_dir']}) were trained on {trained_on}, "
                     f"but the base checkpoint is now {base}; rerun {stage} (remove its folder) on this base")
  return manifest["adapter_dir"]


def load_retriever(cfg: ConfigDict, workdir: str, stage: str | None = None, *, mesh=None):
  """(model, tokenizer, adapter_dir): the base model (`foundation_checkpoint`) with the adapters of training stage
  `stage` merged in ("adapt", "refine", "round2/refine", ...; None: `latest_adapters`, base alone before Stage 1),
  on `mesh` (default: the config's)."""
  from recall_jax.models import lora, peft_io
  stage = stage or latest_adapters(cfg, workdir)
  adapter_dir = trained_adapters(cfg, workdir, stage) if stage else None
  model, tokenizer = load_base_model(cfg, workdir, mesh=mesh)
  if adapter_dir:
    peft_io.import_peft(model, adapter_dir, names=family.of_model(model).peft_names)
    lora.merge_lora(model)
    place_model(model, cfg, mesh)
  return model, tokenizer, adapter_dir


def round_retriever(cfg: ConfigDict, workdir: str, round_num: int, *, mesh=None):
  """(model, tokenizer, adapter_dir) that round `round_num` mines with: `round_start_stage`'s adapters on the base.
  Round 1 before Stage 1 has finished mines with the base model alone (adapter_dir None, as its manifest records);
  a later round without the previous round's refine is an error."""
  from recall_jax.stages import artifacts
  stage = round_start_stage(round_num)
  if round_num == 1 and not artifacts.is_done(workdir, stage):
    return (*load_base_model(cfg, workdir, mesh=mesh), None)
  return load_retriever(cfg, workdir, stage, mesh=mesh)


def model_family(cfg: ConfigDict) -> family.Family:
  """The configured backbone (config model.family)."""
  return family.get(cfg.model.family)


def encode_config(cfg: ConfigDict) -> pipeline.EncodeConfig:
  """The data settings of the config with the image processor of its model family (patch size, mean / std)."""
  d, fam = cfg.data, model_family(cfg)
  return pipeline.EncodeConfig(
      image_buckets=ImageBuckets.from_config(d.image_buckets, factor=fam.image_factor),
      query_lengths=tuple(d.query_lengths), target_lengths=tuple(d.target_lengths), caption_join=d.caption_join,
      patch_size=fam.patch_size, image_mean=fam.image_mean, image_std=fam.image_std)


def read_splits(cfg: ConfigDict, workdir: str, split: str) -> list[CIRSplit]:
  """The configured dataset's splits (FashionIQ: one per category), in the configured data.format: the published
  layout under data.root (or the synthetic world's copy of it), or its ArrayRecord form (stages/data_source.py)."""
  return data_source.read_splits(cfg, workdir, split)


def protocol(cfg: ConfigDict, dataset: str) -> dict:
  """The evaluation protocol of `dataset` under the config (eval.exclude_reference, FashionIQ's data.caption_join):
  one definition for Stage 1's model selection, the evaluate stage and the adapters' recall_config.json."""
  out = retrieval.default_protocol(dataset)
  if cfg.eval.exclude_reference is not None:
    out["exclude_reference"] = bool(cfg.eval.exclude_reference)
  if dataset == "fashioniq":
    out["caption_join"] = cfg.data.caption_join
  return out


def adapter_recall_config(cfg: ConfigDict, stage: str, base_checkpoint: str) -> recall_config.RecallConfig:
  """What adapters trained by `stage` under `cfg` embed with (written beside them as recall_config.json)."""
  return recall_config.RecallConfig(
      base_checkpoint=files.absolute(base_checkpoint), dtype=cfg.model.dtype, position_mode=cfg.model.position_mode,
      dataset=cfg.data.dataset, encode=encode_config(cfg), prompts=recall_config.prompt_templates(cfg.data.dataset),
      protocol=protocol(cfg, cfg.data.dataset), categories=tuple(cfg.data.categories),
      image_ext=cfg.data.image_ext, eval_batch_size=int(cfg.eval.batch_size), stage=stage)
