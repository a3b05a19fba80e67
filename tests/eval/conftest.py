"""Small random CIR splits with integer-valued embeddings: dot products are exact, so ties are real and a plain
Python reference ranking (sorted by (-score, gallery index)) is exactly comparable."""

import numpy as np
import pytest

from recall_jax.data.records import CIRSplit, Query


def int_embeddings(rng, n, dim=6):
  return rng.integers(-2, 3, size=(n, dim)).astype(np.float32)


def _build(dataset, num_q, num_g, seed, with_targets=True, category=None, num_gt=1):
  rng = np.random.default_rng(seed)
  gallery = tuple(f"{100000 + i:012d}" if dataset == "circo" else f"img{i}" for i in range(num_g))
  queries = []
  for q in range(num_q):
    ref = int(rng.integers(num_g))
    others = [int(x) for x in rng.permutation(num_g) if x != ref]
    targets = tuple(gallery[t] for t in others[:int(rng.integers(1, num_gt + 1))]) if with_targets else ()
    subset = ()
    if dataset == "cirr":
      members = [ref] + others[:5]  # the target (others[0]) is always among them, like CIRR
      subset = tuple(gallery[m] for m in (members[j] for j in rng.permutation(6)))
    queries.append(Query(qid=str(1000 + q), reference=gallery[ref], captions=("c",), targets=targets,
                         category=category, subset=subset, source=f"test.json#{q}"))
  split = CIRSplit(dataset=dataset, split="val" if with_targets else "test", queries=tuple(queries),
                   images={n: f"/x/{n}.png" for n in gallery}, gallery=gallery, category=category)
  return split, int_embeddings(rng, num_q), int_embeddings(rng, num_g)


@pytest.fixture
def make_split():
  return _build


def reference_order(query_emb, gallery_emb, q, candidates):
  """Python reference: candidates sorted by (-score, gallery index), scores in float64 (exact for int embeddings)."""
  scores = gallery_emb.astype(np.float64) @ query_emb[q].astype(np.float64)
  return sorted(candidates, key=lambda g: (-scores[g], g))


@pytest.fixture
def ref_order():
  return reference_order
