"""A checkpoint's Hugging Face tokenizer, read from and written to any path files.py takes (a bucket included)."""

from __future__ import annotations

from recall_jax import files


def load_tokenizer(path: str):
  """The checkpoint's tokenizer (transformers AutoTokenizer); from a bucket its files are read through a local
  copy (without the weights)."""
  from transformers import AutoTokenizer
  with files.local_view(path, skip_suffixes=(".safetensors",)) as local:
    return AutoTokenizer.from_pretrained(local)


def save_tokenizer(tokenizer, path: str) -> None:
  """tokenizer.save_pretrained(path); into a bucket through a local folder."""
  with files.local_output(path) as local:
    tokenizer.save_pretrained(local)
