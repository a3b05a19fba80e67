"""Embedding a whole split with a model: Grain eval batches (fixed shapes) -> sharded jitted embedding -> host fp32.

Nothing here is cached between calls: every call embeds with the model it is given. (ReCALL's PyTorch code keeps an
embedding cache keyed by the file list only, so a second mining round silently reuses the first round's embeddings;
`fingerprint` lets a stage record what it embedded so tests and the report can tell.)
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from recall_jax import parallel
from recall_jax.data import pipeline
from recall_jax.data.records import CIRSplit
from recall_jax.models import embedding
from recall_jax.models.family import batch_geometry
from recall_jax.progress import Progress

log = logging.getLogger("recall_jax")


@functools.partial(jax.jit, static_argnums=0)
def _embed_step(graphdef, state, inputs):
  return embedding.embed(nnx.merge(graphdef, state), inputs)


def _embed_dataset(model, dataset, prefix: str, count: int, mesh: Optional[Mesh], label: str) -> np.ndarray:
  """Embeds this process's slices of every global batch; returns all `count` rows on every process."""
  graphdef, state = nnx.split(model)
  out: Optional[np.ndarray] = None
  filled = np.zeros(count, bool)
  progress = Progress(len(dataset), unit="batches")
  pending = []
  for step, batch in enumerate(pipeline.make_iterator(dataset, num_threads=2, prefetch=2)):
    inputs = embedding.side_inputs(model, batch, prefix)
    if mesh is not None:
      inputs = _to_mesh(model, inputs, batch[f"{prefix}_image_grid_thw"], mesh)
    # Dispatch now, read back later: the host keeps preparing batches while the device computes.
    pending.append((batch["index"], batch["valid"], parallel.settle(_embed_step(graphdef, state, inputs))))
    if (step + 1) % 20 == 0 or step + 1 == len(dataset):
      for index, valid, emb in pending:
        emb = np.asarray(jax.device_get(emb) if mesh is None else parallel.local_rows(emb, mesh), np.float32)
        if out is None:
          out = np.zeros((count, emb.shape[-1]), np.float32)
        out[index[valid]] = emb[valid]
        filled[index[valid]] = True
      pending.clear()
      log.info("[%s] %s", label, progress.line(step + 1))
  if out is None:
    raise ValueError(f"{label}: nothing to embed")
  return parallel.gather_rows(out, filled)


def _to_mesh(model, inputs: dict[str, Any], grids: np.ndarray, mesh: Mesh) -> dict[str, Any]:
  """This process's slice of a batch -> global arrays: per-example arrays and the pixel rows (image-major, so whole
  images per shard) over the batch axes; the vision geometry, of the global batch's images, replicated (XLA
  inserts the collectives)."""
  images = len(grids) * jax.process_count()
  vision = batch_geometry(model.cfg.vision, tuple(int(g) for g in grids[0]), images)
  return parallel.host_to_global({**inputs, "vision": vision}, mesh, batch_axes={"position_ids": 1})


def _name(split: CIRSplit) -> str:
  return f"{split.dataset}/{split.split}" + (f"/{split.category}" if split.category else "")


def embed_queries(model, split: CIRSplit, *, tokenizer: Any, encode_cfg: pipeline.EncodeConfig, batch_size: int,
                  load: Optional[pipeline.ImageLoader] = None, mesh: Optional[Mesh] = None) -> np.ndarray:
  """Query embeddings (Q, H), fp32 unit-norm, in split order; images are read batch by batch through `load`."""
  load = load or pipeline.FileImages(split.images)
  queries = pipeline.eval_query_dataset(split, load=load, tokenizer=tokenizer, cfg=encode_cfg,
                                        global_batch_size=batch_size)
  return _embed_dataset(model, queries, "query", len(split.queries), mesh, f"embed {_name(split)} queries")


def embed_gallery(model, split: CIRSplit, *, tokenizer: Any, encode_cfg: pipeline.EncodeConfig, batch_size: int,
                  load: Optional[pipeline.ImageLoader] = None, mesh: Optional[Mesh] = None) -> np.ndarray:
  """Gallery embeddings (G, H), fp32 unit-norm, in split order; images are read batch by batch through `load`."""
  load = load or pipeline.FileImages(split.images)
  gallery = pipeline.eval_gallery_dataset(split, load=load, tokenizer=tokenizer, cfg=encode_cfg,
                                          global_batch_size=batch_size)
  return _embed_dataset(model, gallery, "target", len(split.gallery), mesh, f"embed {_name(split)} gallery")


def embed_split(model, split: CIRSplit, *, tokenizer: Any, encode_cfg: pipeline.EncodeConfig, batch_size: int,
                load: Optional[pipeline.ImageLoader] = None, mesh: Optional[Mesh] = None) -> tuple[np.ndarray, np.ndarray]:
  """(query embeddings (Q, H), gallery embeddings (G, H)), fp32 unit-norm, in split order."""
  kw = dict(tokenizer=tokenizer, encode_cfg=encode_cfg, batch_size=batch_size, load=load, mesh=mesh)
  return embed_queries(model, split, **kw), embed_gallery(model, split, **kw)


def fingerprint(*arrays: np.ndarray) -> str:
  """A short digest of embeddings (fp32 bytes and shapes): equal digests = the very same embeddings."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a, np.float32)
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]
