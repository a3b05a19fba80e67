"""Stable fp32 ranking: exact ties by gallery order, reference removal, subsets, chunking, input checks."""

import numpy as np
import pytest

from recall_jax.eval.ranking import rank_gallery


def test_exact_ties_break_by_gallery_order():
  gallery = np.array([[0, 1], [1, 0], [1, 0], [0, 1], [1, 0], [-1, 0]], np.float32)
  query = np.array([[1, 0], [1, 1]], np.float32)
  r = rank_gallery(query, gallery, top_k=6)
  np.testing.assert_array_equal(r.indices[0], [1, 2, 4, 0, 3, 5])
  np.testing.assert_array_equal(r.indices[1], [0, 1, 2, 3, 4, 5])  # all-equal scores except the last
  np.testing.assert_array_equal(r.scores[1], [1, 1, 1, 1, 1, -1])


def test_matches_python_reference_with_exclusion_subsets_and_chunks(ref_order):
  rng = np.random.default_rng(0)
  q = rng.integers(-2, 3, (23, 5)).astype(np.float32)
  g = rng.integers(-2, 3, (40, 5)).astype(np.float32)
  exclude = rng.integers(-1, 40, 23).astype(np.int32)
  subsets = np.stack([rng.permutation(40)[:6] for _ in range(23)]).astype(np.int32)
  subsets[:, 0] = np.where(exclude >= 0, exclude, subsets[:, 0])  # the reference is a member
  subsets[3, 5] = -1  # padding
  for chunk in (4, 256):
    r = rank_gallery(q, g, exclude=exclude, top_k=39, subsets=subsets, chunk_size=chunk)
    for i in range(23):
      full = ref_order(q, g, i, [j for j in range(40) if j != exclude[i]])
      np.testing.assert_array_equal(r.indices[i], full[:39])
      members = [int(m) for m in subsets[i] if m >= 0 and m != exclude[i]]
      expect = ref_order(q, g, i, members)
      np.testing.assert_array_equal(r.subset[i], expect + [-1] * (6 - len(expect)))
      # the subset order is the full ranking filtered to the members
      assert expect == [j for j in full if j in members]


def test_scores_are_fp32_dot_products_of_the_ranked_items():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(5, 32)).astype(np.float32)
  g = rng.normal(size=(70, 32)).astype(np.float32)
  r = rank_gallery(q, g, top_k=10)
  assert r.scores.dtype == np.float32 and r.indices.dtype == np.int32
  np.testing.assert_allclose(r.scores, np.take_along_axis(q @ g.T, r.indices, 1), rtol=1e-5)


def test_bad_inputs_raise():
  g = np.ones((4, 3), np.float32)
  with pytest.raises(ValueError, match=r"top_k=4 must be in \[1, 3\].*reference removed"):
    rank_gallery(g[:2], g, exclude=np.array([0, -1]), top_k=4)
  with pytest.raises(ValueError, match="non-finite"):
    rank_gallery(np.array([[np.nan, 0, 0]], np.float32), g, top_k=1)
  with pytest.raises(ValueError, match="dim 2 != gallery_emb dim 3"):
    rank_gallery(np.ones((1, 2), np.float32), g, top_k=1)
  with pytest.raises(ValueError, match="exclude must be"):
    rank_gallery(g[:2], g, exclude=np.array([0, 9]), top_k=1)
