"""Server files (CIRR rc2 pair, CIRCO), ranked lists and atomic results files."""

import json
import os

import pytest

from recall_jax.eval import results, retrieval, submission


def _ranked(make_split, dataset, **kw):
  split, q_emb, g_emb = make_split(dataset, **kw)
  protocol = retrieval.default_protocol(dataset)
  return split, retrieval.rank_split(split, q_emb, g_emb, protocol), protocol


def test_cirr_test_split_files_have_the_server_format(make_split, tmp_path):
  split, ranking, protocol = _ranked(make_split, "cirr", num_q=12, num_g=70, seed=0, with_targets=False)
  paths = submission.write_split_outputs(str(tmp_path), "run1", split, ranking, protocol)
  assert sorted(os.path.basename(p) for p in paths) == [
      "ranked_cirr_test_run1.json", "recall_submission_test_run1.json", "recall_subset_submission_test_run1.json"]
  with open(tmp_path / "recall_submission_test_run1.json") as f:
    recall = json.load(f)
  with open(tmp_path / "recall_subset_submission_test_run1.json") as f:
    subset = json.load(f)
  assert recall.pop("version") == "rc2" and recall.pop("metric") == "recall"
  assert subset.pop("version") == "rc2" and subset.pop("metric") == "recall_subset"
  assert list(recall) == list(subset) == [q.qid for q in split.queries]
  for q, row, sub in zip(split.queries, ranking.indices, ranking.subset):
    assert recall[q.qid] == [split.gallery[i] for i in row[:50]] and len(recall[q.qid]) == 50
    assert q.reference not in recall[q.qid] and len(set(recall[q.qid])) == 50
    assert len(subset[q.qid]) == 3 and set(subset[q.qid]) <= set(q.subset) - {q.reference}
    assert subset[q.qid] == [split.gallery[i] for i in sub[:3]]


def test_circo_submission_uses_integer_ids(make_split, tmp_path):
  split, ranking, protocol = _ranked(make_split, "circo", num_q=6, num_g=60, seed=1, with_targets=False)
  path = submission.write_circo_submission(str(tmp_path), "run1", split, ranking)
  with open(path) as f:
    data = json.load(f)
  assert list(data) == [q.qid for q in split.queries]
  for q, row in zip(split.queries, ranking.indices):
    assert data[q.qid] == [int(split.gallery[i]) for i in row[:50]] and all(type(x) is int for x in data[q.qid])
  assert data[split.queries[0].qid][0] >= 100000


def test_cirr_submission_rejects_other_datasets(make_split):
  split, ranking, _ = _ranked(make_split, "fashioniq", num_q=3, num_g=20, seed=2, category="dress")
  with pytest.raises(ValueError, match="needs a CIRR split"):
    submission.cirr_submission(split, ranking)
  with pytest.raises(ValueError, match="needs a CIRCO split"):
    submission.circo_submission(split, ranking)


def test_results_file_records_everything_and_is_atomic(tmp_path):
  path = str(tmp_path / "sub" / "results.json")
  results.write_results(path, metrics={"R@1": 51.2}, protocol={"exclude_reference": True},
                        config={"lr": 2e-5, "model": {"dim": 8}}, checkpoint="/ckpt/step_500")
  record = results.read_results(path)
  assert record == {"metrics": {"R@1": 51.2}, "protocol": {"exclude_reference": True},
                    "config": {"lr": 2e-5, "model": {"dim": 8}}, "checkpoint": "/ckpt/step_500"}
  with pytest.raises(ValueError, match="results config is not JSON-serialisable"):
    results.write_results(path, metrics={}, protocol={}, config={"x": object()}, checkpoint="c")
  with pytest.raises(ValueError, match="results metrics is not JSON-serialisable"):
    results.write_results(path, metrics={"R@1": float("nan")}, protocol={}, config={}, checkpoint="c")
  assert results.read_results(path) == record  # failed writes left the old file intact
  assert os.listdir(tmp_path / "sub") == ["results.json"]  # and no temp files behind
