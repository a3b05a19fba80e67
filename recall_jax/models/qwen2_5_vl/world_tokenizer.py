"""A byte-level BPE tokenizer trained on the synthetic world's text, in the tiny tokenizer's id layout.

The tiny byte-level tokenizer spells a rewrite prompt in ~1,200 tokens, too long for a tiny model to learn on a CPU.
This one is trained with Hugging Face `tokenizers` (Qwen's pre-tokenizer, byte-level alphabet, so any text still
encodes) on what the foundation model reads and writes on the world: captions, edit paraphrases, questions, the
packaged prompt templates and the JSON answer shapes (`recall_jax.stages.tokenizer_corpus`). Its ids keep the tiny
layout, so the tiny config's special-token ids hold for both:

  ids 0..255    the 256 byte-level symbols in GPT-2 / Qwen order,
  ids 256..269  the Qwen special tokens at their pinned ids (`TINY_TOKEN_IDS`),
  ids 270..     the learned merges, in merge order, up to `vocab_size`.

The result is a `Qwen2Tokenizer` (Qwen's chat template, eos and pad) saved for `AutoTokenizer.from_pretrained(dir)`.
Training is deterministic in its corpus: the corpus is de-duplicated and sorted, and the trainer runs on one thread.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

from transformers import Qwen2Tokenizer

from recall_jax.models.qwen2_5_vl.tiny_tokenizer import FIRST_MERGE_ID, build_qwen2_tokenizer

WORLD_VOCAB_SIZE = 1024


def train_merges(corpus: Iterable[str], vocab_size: int = WORLD_VOCAB_SIZE) -> list[tuple[str, str]]:
  """The BPE merges (in order) learned from `corpus` under Qwen's byte-level pre-tokenisation."""
  num_merges = vocab_size - FIRST_MERGE_ID
  if num_merges < 1:
    raise ValueError(f"vocab_size {vocab_size} leaves no room for merges (the first merge id is {FIRST_MERGE_ID})")
  texts = sorted(set(corpus))
  if not texts:
    raise ValueError("the tokenizer corpus is empty")
  os.environ["RAYON_NUM_THREADS"] = "1"  # parallel pair counting could break count ties in another order
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = build_qwen2_tokenizer([]).backend_tokenizer.pre_tokenizer  # Qwen's split + ByteLevel
  trainer = trainers.BpeTrainer(vocab_size=256 + num_merges, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=[], show_progress=False, min_frequency=2)
  tok.train_from_iterator(texts, trainer=trainer)
  merges = json.loads(tok.to_str())["model"]["merges"]
  return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges][:num_merges]


def build_world_tokenizer(corpus: Iterable[str], vocab_size: int = WORLD_VOCAB_SIZE,
                          save_dir: Optional[str] = None) -> Qwen2Tokenizer:
  """Trains the world BPE on `corpus`; the Qwen2 tokenizer over it (saved to `save_dir` when given)."""
  return build_qwen2_tokenizer(train_merges(corpus, vocab_size), vocab_size, save_dir)
