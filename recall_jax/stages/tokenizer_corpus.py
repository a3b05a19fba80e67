"""The text a foundation model reads and writes on the synthetic world: the training corpus of the world tokenizer.

Built from the training splits only (never val / test), with the frequencies the model will see them at: the
retrieval query and target prompts of every training triplet, and every SFT example (captions, questions, the
rewrite and verification prompts with their JSON / yes-no answers; `recall_jax.generate.sft`). Special tokens are
removed: they have fixed ids and are never merged.
"""

from __future__ import annotations

import os
import re

from recall_jax import files
from recall_jax.data import prompts, readers
from recall_jax.generate import sft
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import TINY_TOKEN_IDS

_SPECIALS = re.compile("|".join(re.escape(t) for t in TINY_TOKEN_IDS))


def world_corpus(world_root: str, *, prompt_dir: str = "", prompt_mode: str = "minimal_json", reasoning: str = "direct",
                 verify_turns: int = 1, caption_join: str = "and", seed: int = 0) -> list[str]:
  """Texts of the world's training splits under `world_root` (FashionIQ and CIRR layouts), in a fixed order."""
  splits = []
  if files.is_dir(os.path.join(world_root, "fashioniq")):
    splits += readers.read_fashioniq(os.path.join(world_root, "fashioniq"), "train")
  if files.is_dir(os.path.join(world_root, "cirr")):
    splits.append(readers.read_cirr(os.path.join(world_root, "cirr"), "train"))
  if not splits:
    raise FileNotFoundError(f"{world_root} holds no FashionIQ or CIRR layout to build the tokenizer corpus from")
  texts = [prompts.target_prompt()]
  for split in splits:
    for q in split.queries:
      texts.append(prompts.query_prompt(split.dataset, q.captions, q.category, caption_join=caption_join))
    cfg = sft.SFTConfig(lengths=(1,), batch_size=1, prompt_dir=prompt_dir, caption_join=caption_join,
                        prompt_mode=prompt_mode, reasoning=reasoning, verify_turns=verify_turns)
    texts += [e.prompt + e.answer for e in sft.build_examples(split.queries, split.images, cfg, seed=seed)]
  return [_SPECIALS.sub("\n", t) for t in texts]
