"""The user-facing embedding API: Embedder (models.embedding's last-token embedding of a base model with adapters).

Query prompt = reference image + modification instruction; target prompt = image only.

    embedder = Embedder.from_pretrained("runs/cirr_7b/refine/adapters")  # base + preprocessing: recall_config.json
    q = embedder.embed_queries(["ref.png"], ["is red with long sleeves"])
    g = embedder.embed_targets(gallery_paths, cache_dir="~/.cache/recall_jax/gallery")
    indices, scores = embedder.search(q, g, k=10)

Images are read and decoded batch by batch (Grain, fixed-shape batches), through the same encoding functions the
stages evaluate with (`eval.embeddings`), so an Embedder from a stage's adapters embeds as that stage did.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from PIL import Image

from recall_jax import files, parallel, recall_config
from recall_jax.data import pipeline, prompts
from recall_jax.data.image import load_image
from recall_jax.data.records import CIRSplit, Query
from recall_jax.eval import embedding_cache, embeddings
from recall_jax.eval.ranking import rank_gallery


class _Images:
  """Image name (the item's index) -> PIL image, decoded only when its batch is encoded."""

  def __init__(self, images: Sequence[Any]):
    self.images = list(images)

  def __call__(self, name: str) -> Image.Image:
    image = self.images[int(name)]
    return image if isinstance(image, Image.Image) else load_image(os.fspath(image))


def _state_digest(model) -> str:
  """Digest of every weight of `model` (for an Embedder built from a model object, which has no files)."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(nnx.state(model))[0], key=lambda kv: str(kv[0])):
    a = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


class Embedder:
  """A base checkpoint (+ merged adapters) with the preprocessing it embeds with: queries, a gallery, top-k search.

  The plain constructor takes the model and every preprocessing setting explicitly; `from_pretrained` reads them
  from the adapters' recall_config.json. `identity` describes where the weights came from (for cache keys); None
  hashes the weights themselves when a cache needs it. With a `mesh`, the weights are placed on it (replicated, or by
  `sharding_rules`) and every batch is sharded over its batch axes (`batch_size` must divide into them).
  """

  def __init__(self, model, tokenizer, *, encode: pipeline.EncodeConfig, dataset: str, batch_size: int = 16,
               mesh=None, sharding_rules=(), identity: Optional[dict] = None):
    if dataset not in prompts.QUERY_INSTRUCTIONS:
      raise ValueError(f"Embedder dataset must be one of {sorted(prompts.QUERY_INSTRUCTIONS)}, got {dataset!r}")
    if mesh is not None:
      if batch_size % parallel.batch_shards(mesh):
        raise ValueError(f"Embedder batch_size {batch_size} does not divide into the {parallel.batch_shards(mesh)} "
                         f"batch shards of mesh {dict(mesh.shape)}")
      nnx.update(model, parallel.place_params(nnx.state(model), mesh, sharding_rules))
    self.model, self.tokenizer, self.dataset, self.encode = model, tokenizer, dataset, encode
    self.batch_size, self.mesh = batch_size, mesh
    self._identity = identity

  @classmethod
  def from_pretrained(cls, adapter_dir: str, *, checkpoint: Optional[str] = None, dtype: Optional[str] = None,
                      position_mode: Optional[str] = None, dataset: Optional[str] = None,
                      encode: Optional[pipeline.EncodeConfig] = None, batch_size: Optional[int] = None,
                      mesh=None) -> "Embedder":
    """The adapters of `adapter_dir` merged into their base, embedding with the preprocessing they were trained with
    (recall_config.json beside them; a missing file raises naming it). A keyword given here overrides the file:
    checkpoint (the base, e.g. moved), dtype ("float32" / "bfloat16"), position_mode, dataset, encode, batch_size
    (default: the run's eval batch size)."""
    from recall_jax.models import family, lora, peft_io, tokenizers
    from recall_jax.models.dtypes import DTYPES
    rc = recall_config.read(adapter_dir)
    checkpoint = checkpoint or rc.base_checkpoint
    dtype = dtype or rc.dtype
    position_mode = position_mode or rc.position_mode
    if dtype not in DTYPES:
      raise ValueError(f"Embedder.from_pretrained dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not files.is_file(os.path.join(checkpoint, "config.json")):
      raise FileNotFoundError(f"base checkpoint {checkpoint} (base_checkpoint of "
                              f"{os.path.join(adapter_dir, recall_config.FILENAME)}) has no config.json: pass "
                              "checkpoint= where the base now is")
    fam = family.of_checkpoint(checkpoint)
    model = fam.from_pretrained(checkpoint, dtype=DTYPES[dtype], position_mode=position_mode, mesh=mesh)
    peft_io.import_peft(model, adapter_dir, names=fam.peft_names)
    lora.merge_lora(model)
    identity = {
        "checkpoint": [embedding_cache.file_stamp(os.path.join(checkpoint, f)) for f in files.listdir(checkpoint)
                       if files.is_file(os.path.join(checkpoint, f))],
        "adapters": {f: embedding_cache.file_digest(os.path.join(adapter_dir, f)) for f in
                     (peft_io.ADAPTER_CONFIG, peft_io.ADAPTER_WEIGHTS)},
        "dtype": dtype, "position_mode": position_mode}
    return cls(model, tokenizers.load_tokenizer(checkpoint), encode=encode or rc.encode,
               dataset=dataset or rc.dataset, batch_size=batch_size or rc.eval_batch_size, mesh=mesh,
               identity=identity)

  def fingerprint_parts(self) -> dict:
    """What embeddings of this Embedder depend on besides the images: the model and the preprocessing."""
    if self._identity is None:
      self._identity = {"weights": _state_digest(self.model)}
    return {"model": self._identity, "encode": recall_config.encode_to_dict(self.encode), "dataset": self.dataset,
            "prompts": recall_config.prompt_templates(self.dataset)}

  def _split(self, images: Sequence[Any], queries: Sequence[Query] = ()) -> CIRSplit:
    names = tuple(str(i) for i in range(len(images)))
    return CIRSplit(dataset=self.dataset, split="given", queries=tuple(queries),
                    images={n: "<PIL image>" if isinstance(im, Image.Image) else os.fspath(im)
                            for n, im in zip(names, images)},
                    gallery=() if queries else names)

  def _kw(self, images: Sequence[Any]) -> dict:
    return dict(tokenizer=self.tokenizer, encode_cfg=self.encode, batch_size=self.batch_size, load=_Images(images),
                mesh=self.mesh)

  def embed_queries(self, images: Sequence[Any], texts: Sequence[str], *, category: Optional[str] = None,
                    captions: Optional[Sequence[Sequence[str]]] = None) -> np.ndarray:
    """Query embeddings (N, H). `texts` are modification texts (FashionIQ: pass `captions` pairs instead)."""
    if captions is None:
      captions = [(t,) for t in texts]
    if len(captions) != len(images):
      raise ValueError(f"embed_queries: {len(images)} images but {len(captions)} texts")
    queries = [Query(qid=str(i), reference=str(i), captions=tuple(c), category=category)
               for i, c in enumerate(captions)]
    return embeddings.embed_queries(self.model, self._split(images, queries), **self._kw(images))

  def embed_targets(self, images: Sequence[Any], *, cache_dir: Optional[str] = None) -> np.ndarray:
    """Gallery embeddings (N, H) of image paths or PIL images. With `cache_dir`, embeddings are reused when the
    model, the preprocessing and the images (paths, sizes, mtimes / pixels) are all the same."""
    if cache_dir:
      cache_dir = os.path.expanduser(cache_dir)
      parts = {**self.fingerprint_parts(), "gallery": embedding_cache.gallery_identity(images),
               "count": len(images)}
      cached = embedding_cache.load(cache_dir, parts, len(images))
      if cached is not None:
        return cached
    emb = embeddings.embed_gallery(self.model, self._split(images), **self._kw(images))
    if cache_dir:
      embedding_cache.store(cache_dir, parts, emb)
    return emb

  def embed_split(self, split: CIRSplit,
                  load: Optional[pipeline.ImageLoader] = None) -> tuple[np.ndarray, np.ndarray]:
    """(query, gallery) embeddings of a dataset split, exactly as the evaluate stage computes them. `load` reads its
    images (default: the files of `split.images`); for a built ArrayRecord split, pass the ImageRecords of
    `split, load = tfds_builders.load_built_split(data_dir, config, name)`."""
    return embeddings.embed_split(self.model, split, tokenizer=self.tokenizer, encode_cfg=self.encode,
                                  batch_size=self.batch_size, load=load, mesh=self.mesh)

  @staticmethod
  def search(query_emb: np.ndarray, gallery_emb: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    ranking = rank_gallery(query_emb, gallery_emb, top_k=min(k, len(gallery_emb)))
    return ranking.indices, ranking.scores
