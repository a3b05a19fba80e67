"""The config's device programs lowered from abstract inputs (no weights, no data), for the AOT plan (aot.py).

Each builder takes the run config, a Qwen2.5-VL model config and a mesh, and returns a `jax.stages.Lowered` of the
project's own jitted function, with inputs as `jax.ShapeDtypeStruct`s sharded as the stages place them:
  * train:   train/step.make_train_step (adapters as configured, GradCache chunks, one image bucket, the lengths);
  * prefill / decode: generate/sampler's jitted_prefill and jitted_decode at calibrate's batch, two images per
    prompt (reference and candidate), the longest prompt bucket and its cache;
  * embed:   eval/embeddings._embed_step, the query side (the longer one) at the larger of eval / mine batch sizes, on
    the merged model (mine and evaluate merge the adapters).
The base is placed by the config's sharding rules (parallel.tree_shardings), batches over the batch axes; the
calibrate sampler does not shard yet, so its plan is the sharded layout the stages are moving to.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from recall_jax import parallel
from recall_jax.data.image import ImageBuckets
from recall_jax.eval import embeddings
from recall_jax.generate import sampler as sampler_lib
from recall_jax.generate.sampling import SamplingConfig
from recall_jax.models import embedding
from recall_jax.models.dtypes import DTYPES
from recall_jax.models import family
from recall_jax.train import step as step_lib
from recall_jax.train import settings, trainer

IMAGES_PER_PROMPT = 2  # calibrate's prompts show the reference and the candidate


def image_grid(cfg: ConfigDict, model_cfg) -> tuple[int, int, int]:
  """The grid of the config's largest image bucket (a training batch holds one bucket: the worst case)."""
  buckets = ImageBuckets.from_config(cfg.data.image_buckets, factor=2 * model_cfg.vision.patch_size)
  size = max(buckets.sizes, key=lambda s: s[0] * s[1])
  return buckets.grid(size, model_cfg.vision.patch_size)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def _replicated(tree, mesh: Mesh):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=NamedSharding(mesh, P())), tree)


def _model(cfg: ConfigDict, model_cfg, adapters: bool):
  dtype = DTYPES[cfg.model.dtype]

  def build():
    model = family.of_config(model_cfg).model_cls(model_cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    if adapters:
      trainer.add_adapters(model, cfg, cfg.seed)
    return model

  return nnx.eval_shape(build)


def _placed(state, mesh: Mesh, cfg: ConfigDict):
  return _abstract(state, parallel.tree_shardings(state, mesh, parallel.rules_from_config(cfg)))


def _prompt_ids(model_cfg, length: int, image_tokens: int, images: int) -> np.ndarray:
  """One row of `length` ids holding `images` image runs (vision start, pads, vision end), text after them."""
  run = [model_cfg.vision_start_token_id] + [model_cfg.image_token_id] * image_tokens + [model_cfg.vision_end_token_id]
  ids = run * images
  if len(ids) > length:
    raise ValueError(f"{images} image(s) of {image_tokens} tokens do not fit a prompt of {length} tokens")
  return np.asarray(ids + [0] * (length - len(ids)), np.int32)


def _pipeline_side(model_cfg, side: str, rows: int, length: int, grid) -> dict[str, np.ndarray]:
  """`rows` examples of one side as pipeline batches hold them: one image per row."""
  patches = int(np.prod(grid))
  ids = np.tile(_prompt_ids(model_cfg, length, patches // model_cfg.vision.spatial_merge_size**2, 1), (rows, 1))
  return {f"{side}_input_ids": ids, f"{side}_attention_mask": np.ones_like(ids),
          f"{side}_image_grid_thw": np.tile(np.asarray(grid, np.int64), (rows, 1)),
          f"{side}_pixel_values": np.zeros((rows, patches, model_cfg.vision.patch_dim), np.float32)}


def train(cfg: ConfigDict, model_cfg, mesh: Mesh) -> jax.stages.Lowered:
  t = cfg.train
  batch, num_chunks = t.global_batch_size, trainer.gradcache_chunks(t)
  grid = image_grid(cfg, model_cfg)
  model = _model(cfg, model_cfg, adapters=True)
  model.train()  # as fit: dropout active
  graphdef, trained, rng_state, rest = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
  frozen = (_replicated(rng_state, mesh), _placed(rest, mesh, cfg))
  tx = settings.optimizer(cfg.optim).optimizer(t.steps)
  state = _replicated(jax.eval_shape(lambda p: trainer.initial_state(p, tx, cfg.seed), nnx.to_pure_dict(trained)),
                      mesh)
  # One example through the project's host layout, widened to the global batch.
  example = {**_pipeline_side(model_cfg, "query", 1, max(cfg.data.query_lengths), grid),
             **_pipeline_side(model_cfg, "target", 1, max(cfg.data.target_lengths), grid),
             "valid": np.ones((1,), bool), "target_ids": np.zeros((1,), np.int32),
             "group_ids": np.zeros((1,), np.int32)}
  arrays, geometry = step_lib.host_batch(model_cfg, example, images_per_call=batch // num_chunks)
  arrays = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch, *x.shape[1:]), x.dtype,
                                                       sharding=parallel.batch_sharding(mesh, x.ndim)), arrays)
  step = step_lib.make_train_step(graphdef, tx, settings.loss(cfg.loss), num_chunks=num_chunks)
  return step.lower(state, frozen, arrays, _replicated(geometry, mesh))


def _batch_sharded(inputs: dict[str, Any], mesh: Mesh,
                   axes=(("input_ids", 0), ("attention_mask", 0), ("pixel_values", 0), ("position_ids", 1))):
  """As eval/embeddings._to_mesh: per-example arrays, the image-major pixel rows and the position ids (3, B, L) over
  the batch axes, the rest (vision geometry) replicated."""
  axes = dict(axes)
  return {k: (jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=parallel.batch_sharding(mesh, np.ndim(v), axes[k]))
              if k in axes else _replicated(v, mesh)) for k, v in inputs.items()}


def embed_batch_size(cfg: ConfigDict) -> int:
  return max(cfg.eval.batch_size, cfg.mine.batch_size)


def embed(cfg: ConfigDict, model_cfg, mesh: Mesh) -> jax.stages.Lowered:
  model = _model(cfg, model_cfg, adapters=False)
  model.eval()
  graphdef, state = nnx.split(model)
  batch = embed_batch_size(cfg)
  side = _pipeline_side(model_cfg, "query", batch, max(cfg.data.query_lengths), image_grid(cfg, model_cfg))
  inputs = embedding.side_inputs(model, side, "query")
  return embeddings._embed_step.lower(graphdef, _placed(state, mesh, cfg), _batch_sharded(inputs, mesh))


def calibrate_shapes(cfg: ConfigDict) -> tuple[int, int, int]:
  """(batch, prompt bucket, cache slots) of calibrate's longest prompts."""
  c = cfg.calibrate
  prompt = max(c.prompt_lengths)
  return c.batch_size, prompt, prompt + c.max_new_tokens


def calibrate(cfg: ConfigDict, model_cfg, mesh: Mesh) -> tuple[jax.stages.Lowered, Any]:
  """(prefill lowered, a function compiled prefill -> decode lowered, fed with prefill's output shardings)."""
  c = cfg.calibrate
  model = _model(cfg, model_cfg, adapters=False)
  model.eval()
  graphdef, state = nnx.split(model)
  state = _placed(state, mesh, cfg)
  batch, prompt, cache_length = calibrate_shapes(cfg)
  grid = image_grid(cfg, model_cfg)
  tokens = int(np.prod(grid)) // model_cfg.vision.spatial_merge_size**2
  ids = np.tile(_prompt_ids(model_cfg, prompt, tokens, IMAGES_PER_PROMPT), (batch, 1))
  grids = np.tile(np.asarray(grid, np.int64), (batch * IMAGES_PER_PROMPT, 1))
  pixels = np.zeros((batch * IMAGES_PER_PROMPT * int(np.prod(grid)), model_cfg.vision.patch_dim), np.float32)
  inputs = _batch_sharded(model.prepare(ids, np.ones_like(ids), grids, pixels), mesh)
  prefill = sampler_lib.jitted_prefill.lower(graphdef, state, inputs, cache_length)

  def decode(compiled_prefill) -> jax.stages.Lowered:
    shapes = jax.eval_shape(sampler_lib.jitted_prefill, graphdef, state, inputs, cache_length)
    logits, cache, positions = _abstract(shapes, compiled_prefill.output_shardings)
    rng = _replicated(jax.eval_shape(lambda: jax.random.key(c.seed)), mesh)
    eos, pad = _replicated((np.zeros((2,), np.int32), np.zeros((), np.int32)), mesh)
    sampling = SamplingConfig(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
    return sampler_lib.jitted_decode.lower(graphdef, state, cache, logits, positions, rng, eos, pad,
                                           max_new_tokens=c.max_new_tokens, sampling=sampling, return_logits=False)

  return prefill, decode
