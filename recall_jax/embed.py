"""The retrieval embedding model and its user-facing API.

Embedding = the final-norm hidden state at the last token of the prompt (the appended <|endoftext|>),
L2-normalised, in fp32. Query prompt = reference image + modification instruction; target prompt = image only.

    embedder = Embedder.from_pretrained(checkpoint_dir, adapter_dir=None, dataset="cirr")
    q = embedder.encode_query(["ref.png"], ["is red with long sleeves"])
    g = embedder.encode_target(gallery_paths)
    indices, scores = embedder.search(q, g, k=10)
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from recall_jax.data import pipeline, prompts
from recall_jax.data.image import ImageBuckets, load_image
from recall_jax.data.records import Query


def pool_last_token(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """hidden (B, L, H) -> (B, H) at each row's last real token (works for left and right padding)."""
  length = attention_mask.shape[1]
  last = length - 1 - jnp.argmax(attention_mask[:, ::-1].astype(jnp.int32), axis=1)
  return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def embed(model, inputs: dict[str, Any]) -> jax.Array:
  """Pure: `model.prepare` inputs -> (B, H) unit-norm fp32 embeddings. Jittable; differentiable for training."""
  hidden = model.hidden_states(inputs)
  return l2_normalize(pool_last_token(hidden, inputs["attention_mask"]))


def side_inputs(model, batch: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
  """Host side: one side (`query` / `target`) of a pipeline batch -> the model's `prepare` inputs.

  Pipeline batches hold one image per example, padded to the largest bucket: (B, P, patch_dim). All images of a
  batch must share one grid (one bucket per batch) so the patch rows concatenate without padding.
  """
  grids = np.asarray(batch[f"{prefix}_image_grid_thw"])
  if not np.all(grids == grids[:1]):
    raise ValueError(f"{prefix}_image_grid_thw: a batch must hold one image bucket, got grids "
                     f"{sorted(set(map(tuple, grids.tolist())))}")
  pixels = np.asarray(batch[f"{prefix}_pixel_values"])
  patches = int(np.prod(grids[0]))
  pixel_values = pixels[:, :patches].reshape(-1, pixels.shape[-1])
  return model.prepare(batch[f"{prefix}_input_ids"], batch[f"{prefix}_attention_mask"], grids, pixel_values)


@functools.partial(jax.jit, static_argnums=0)
def _embed_jit(graphdef, state, inputs):
  return embed(nnx.merge(graphdef, state), inputs)


class Embedder:
  """Load a base checkpoint (+ adapters), embed queries or a gallery, search top-k."""

  def __init__(self, model, tokenizer, *, dataset: str = "cirr", encode: Optional[pipeline.EncodeConfig] = None,
               batch_size: int = 16, mesh=None):
    self.model, self.tokenizer, self.dataset = model, tokenizer, dataset
    self.encode = encode or pipeline.EncodeConfig(
        image_buckets=ImageBuckets.square(224), query_lengths=(128, 256), target_lengths=(128,))
    self.batch_size, self.mesh = batch_size, mesh

  @classmethod
  def from_pretrained(cls, checkpoint_dir: str, *, adapter_dir: Optional[str] = None, dtype=jnp.float32,
                      **kw) -> "Embedder":
    from transformers import AutoTokenizer

    from recall_jax.models import qwen2_5_vl
    model = qwen2_5_vl.from_pretrained(checkpoint_dir, dtype=dtype)
    if adapter_dir:
      from recall_jax.models import lora, peft_io
      from recall_jax.models.qwen2_5_vl import names as qwen_names
      peft_io.import_peft(model, adapter_dir, names=qwen_names.PEFT_NAMES)
      lora.merge_lora(model)
    return cls(model, AutoTokenizer.from_pretrained(checkpoint_dir), **kw)

  def _run(self, prefix: str, texts: Sequence[str], images: Sequence[Any]) -> np.ndarray:
    from recall_jax.eval.retrieval import embed_in_batches
    loaded = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
    lengths = self.encode.query_lengths if prefix == "query" else self.encode.target_lengths
    graphdef, state = nnx.split(self.model)

    def encode_batch(index: np.ndarray) -> dict[str, np.ndarray]:
      idx = [int(i) for i in index]
      return pipeline.encode_side(prefix, self.tokenizer, [texts[i] for i in idx], [str(i) for i in idx],
                                  lambda name: loaded[int(name)], lengths, self.encode)

    def embed_fn(index):
      batch = encode_batch(np.asarray(index))
      return _embed_jit(graphdef, state, side_inputs(self.model, batch, prefix))

    return embed_in_batches(embed_fn, np.arange(len(loaded)), self.batch_size, mesh=None)

  def encode_query(self, images: Sequence[Any], texts: Sequence[str], *, category: Optional[str] = None,
                   captions: Optional[Sequence[Sequence[str]]] = None) -> np.ndarray:
    """Query embeddings (N, H). `texts` are modification texts (FashionIQ: pass `captions` pairs instead)."""
    if captions is None:
      captions = [(t,) for t in texts]
    if len(captions) != len(images):
      raise ValueError(f"encode_query: {len(images)} images but {len(captions)} texts")
    prompts_ = [pipeline.query_text(self.dataset, Query(qid=str(i), reference=str(i), captions=tuple(c),
                                                        category=category), self.encode)
                for i, c in enumerate(captions)]
    return self._run("query", prompts_, images)

  def encode_target(self, images: Sequence[Any]) -> np.ndarray:
    return self._run("target", [prompts.target_prompt()] * len(images), images)

  @staticmethod
  def search(query_emb: np.ndarray, gallery_emb: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    from recall_jax.eval.ranking import rank_gallery
    ranking = rank_gallery(query_emb, gallery_emb, top_k=min(k, len(gallery_emb)))
    return ranking.indices, ranking.scores
