"""Stable gallery ranking from embeddings: fp32 cosine similarities, ties broken by gallery order.

bf16 similarities create ties that change R@1, so scores are always computed in fp32 at full matmul precision. The
jitted core ranks one fixed-size chunk of queries against the whole gallery; the numpy wrapper walks the queries in
chunks so memory stays at (chunk, gallery) scores. Removing the reference from its own ranking is a protocol switch
(`exclude`), not a property of the data.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Ranking:
  """indices: (Q, top_k) gallery indices, best first; scores: their similarities (fp32);
  subset: (Q, S) the subset members ranked (ties by gallery order), excluded members and -1 padding last as -1."""

  indices: np.ndarray
  scores: np.ndarray
  subset: Optional[np.ndarray] = None


@functools.partial(jax.jit, static_argnames=("top_k",))
def rank_chunk(query: jax.Array, gallery: jax.Array, exclude: jax.Array, subsets: Optional[jax.Array], *,
               top_k: int) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
  """Jittable core. query (C, D), gallery (G, D), exclude (C,) gallery index or -1, subsets (C, S) or None.

  Returns (top-k indices (C, top_k), their scores, ranked subsets (C, S) or None). An excluded item scores -inf, so
  it can only appear after every real item. lax.top_k puts the lower index first on equal values (documented),
  which is the stable order; the subset sort uses the gallery index as its second key for the same order.
  """
  sims = jnp.dot(query.astype(jnp.float32), gallery.astype(jnp.float32).T,
                 precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  removed = jnp.arange(gallery.shape[0])[None, :] == exclude[:, None]
  # -0.0 -> 0.0: top_k orders -0.0 below 0.0 while the sort below ties them; one zero keeps both orders equal.
  sims = jnp.where(removed, -jnp.inf, jnp.where(sims == 0, 0.0, sims))
  scores, indices = jax.lax.top_k(sims, top_k)
  if subsets is None:
    return indices, scores, None
  drop = (subsets < 0) | (subsets == exclude[:, None])
  sub_sims = jnp.take_along_axis(sims, jnp.maximum(subsets, 0), axis=1)
  key = jnp.where(drop, jnp.inf, -sub_sims)
  _, ranked, ranked_drop = jax.lax.sort((key, subsets, drop), dimension=1, num_keys=2)
  return indices, scores, jnp.where(ranked_drop, -1, ranked)


def _check_embeddings(name: str, x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f"{name} must be (N, D), got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError(f"{name} has non-finite values (rows {np.nonzero(~np.isfinite(x).all(1))[0][:10].tolist()})")
  return x


def rank_gallery(query_emb: np.ndarray, gallery_emb: np.ndarray, *, exclude: Optional[np.ndarray] = None,
                 top_k: int, subsets: Optional[np.ndarray] = None, chunk_size: int = 256) -> Ranking:
  """Ranks the gallery for every query by cosine similarity of the given (already normalised) embeddings.

  exclude: (Q,) gallery index removed from each query's ranking (the reference), -1 for none; None = no removal.
  subsets: (Q, S) gallery indices (CIRR img_set members, -1 padding) to rank on their own as well.
  """
  query_emb = _check_embeddings("query_emb", query_emb)
  gallery_emb = _check_embeddings("gallery_emb", gallery_emb)
  (num_q, dim), num_g = query_emb.shape, gallery_emb.shape[0]
  if gallery_emb.shape[1] != dim:
    raise ValueError(f"query_emb dim {dim} != gallery_emb dim {gallery_emb.shape[1]}")
  exclude = np.full((num_q,), -1, np.int32) if exclude is None else np.asarray(exclude, np.int32)
  if exclude.shape != (num_q,) or exclude.min(initial=-1) < -1 or exclude.max(initial=-1) >= num_g:
    raise ValueError(f"exclude must be ({num_q},) gallery indices in [-1, {num_g}), got shape {exclude.shape}")
  removable = int((exclude >= 0).any())
  if not 1 <= top_k <= num_g - removable:
    raise ValueError(f"top_k={top_k} must be in [1, {num_g - removable}] for a gallery of {num_g}"
                     f"{' with the reference removed' if removable else ''}")
  if subsets is not None:
    subsets = np.asarray(subsets, np.int32)
    if subsets.ndim != 2 or subsets.shape[0] != num_q or subsets.min(initial=-1) < -1 or subsets.max(
        initial=-1) >= num_g:
      raise ValueError(f"subsets must be ({num_q}, S) gallery indices in [-1, {num_g}), got shape {subsets.shape}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

  chunk = min(chunk_size, max(num_q, 1))
  gallery = jnp.asarray(gallery_emb)
  indices, scores, ranked_subsets = [], [], []
  for start in range(0, num_q, chunk):
    stop = min(start + chunk, num_q)
    pad = chunk - (stop - start)  # fixed chunk shape: one compilation for all chunks
    q = np.pad(query_emb[start:stop], ((0, pad), (0, 0)))
    ex = np.pad(exclude[start:stop], (0, pad), constant_values=-1)
    sub = None if subsets is None else np.pad(subsets[start:stop], ((0, pad), (0, 0)), constant_values=-1)
    i, s, r = rank_chunk(q, gallery, ex, sub, top_k=top_k)
    indices.append(np.asarray(i)[:stop - start])
    scores.append(np.asarray(s)[:stop - start])
    if r is not None:
      ranked_subsets.append(np.asarray(r)[:stop - start])
  empty = np.zeros((0, top_k))
  return Ranking(
      indices=np.concatenate(indices or [empty]).astype(np.int32),
      scores=np.concatenate(scores or [empty]).astype(np.float32),
      subset=None if subsets is None else np.concatenate(
          ranked_subsets or [np.zeros((0, subsets.shape[1]))]).astype(np.int32))
