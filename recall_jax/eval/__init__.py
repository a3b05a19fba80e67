"""Evaluation: stable ranking (ranking.py), metrics (metrics.py), dataset protocols and sharded embedding
(retrieval.py), test-server and ranked-list files (submission.py), results files (results.py)."""
