"""The foundation model's yes/no decisions as P(yes), read right after the assistant header or after a description.

reasoning "direct": one scoring pass; P(yes) = softmax over the first tokens of the answer words ("no", "yes") at
the answer position, right after the assistant header.

reasoning "describe" (what the teach stage trains with teach.reasoning = "describe": an answer is
"<description>. Answer: yes", sft.decision_answer): two passes.
  (a) greedy-decode up to `max_new_tokens` tokens of the answer from the prompt (batches of `batch_size`, fixed
      shapes: a short last batch repeats its last item);
  (b) cut the decoded text right after its first sft.ANSWER_MARKER, append that prefix to the prompt and score the
      answer words there.
After the marker the word comes with its space ("Answer: yes" tokenises as "Answer:" + " yes" in Qwen's and the
tiny byte-level vocabularies), so in this mode each answer word is scored by the first token of " " + word (a word
that already starts with whitespace is taken as it is). An item whose text lacks the marker has not decided:
P(yes) = 0 (a strict filter rejects it), and it is flagged (`Decisions.no_marker`).

reasoning "describe" in two turns (two_turn_yes_probability; calibrate.verify_turns = 2): greedy-decode each first
turn, append F's reading and the second turn to it, then decide that conversation as above.

The prefix is tokenised on its own and its ids appended to the prompt's, as the SFT data tokenises prompt and answer
separately (sft.tokenize_example): pass (b) sees the token layout F was trained on. Prompt + prefix are padded to
the smallest of `lengths` that fits (calibrate.prompt_lengths, also the Sampler's cache buckets).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np

from recall_jax.data import pipeline, prompts
from recall_jax.generate import sft

REASONING = sft.REASONING


@dataclasses.dataclass(frozen=True)
class Decisions:
  """p_yes (N,) float64; texts: describe reasoning, what F wrote for each item (decoded, special tokens dropped),
  None per item for direct; no_marker (N,) bool: describe items whose text has no marker (their P(yes) is 0)."""

  p_yes: np.ndarray
  texts: tuple[Optional[str], ...]
  no_marker: np.ndarray


def answer_token_ids(tokenizer: Any, words: Sequence[str], reasoning: str = "direct") -> list[int]:
  """The first token id of each answer word as encoded (no special tokens), of " " + word for describe reasoning;
  they must be distinct."""
  if reasoning not in REASONING:
    raise ValueError(f"reasoning must be one of {REASONING}, got {reasoning!r}")
  scored = [w if reasoning == "direct" or w[:1].isspace() else " " + w for w in words]
  ids = []
  for word in scored:
    encoded = tokenizer.encode(word, add_special_tokens=False)
    if not encoded:
      raise ValueError(f"answer word {word!r} (config calibrate.answer_words) encodes to no token")
    ids.append(int(encoded[0]))
  if len(words) != 2 or len(set(ids)) != 2:
    raise ValueError(f"config calibrate.answer_words must be two words (no, yes) with distinct first tokens, got "
                     f"{scored} -> {ids} ({reasoning} reasoning)")
  return ids


def prefix_through_marker(text: str, marker: str = sft.ANSWER_MARKER) -> Optional[str]:
  """`text` up to and including its first `marker`; None without one."""
  at = text.find(marker)
  return None if at < 0 else text[:at + len(marker)]


def build_inputs(tokenizer: Any, prompt_texts: Sequence[str], image_lists: Sequence[Sequence[str]], load: Callable,
                 encode_cfg: pipeline.EncodeConfig, lengths: Sequence[int],
                 answer_prefixes: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
  """Left-padded image prompts as the HF processor would give them: input_ids, attention_mask, pixel_values (all
  patches of all images, prompt order), image_grid_thw (one row per image). With `answer_prefixes`, each prompt is
  followed by its prefix, tokenised on its own."""
  names = [name for images in image_lists for name in images]
  distinct = list(dict.fromkeys(names))
  pixels, grids = pipeline.encode_images([load(name) for name in distinct], encode_cfg)
  where = {name: k for k, name in enumerate(distinct)}
  rows = [pixels[where[n], :int(np.prod(grids[where[n]]))] for n in names]  # drop each image's zero padding
  grid = np.stack([grids[where[n]] for n in names]).astype(np.int64)
  counts = [[int(np.prod(grids[where[n]])) // encode_cfg.merge_size**2 for n in images] for images in image_lists]
  tokens = prompts.tokenize_batch(tokenizer, list(prompt_texts), counts, tuple(lengths), padding_side="left")
  if answer_prefixes is not None:
    tokens = _append(tokenizer, tokens, answer_prefixes, lengths)
  return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
          "pixel_values": np.concatenate(rows).astype(np.float32), "image_grid_thw": grid}


def _append(tokenizer: Any, tokens: dict[str, np.ndarray], tails: Sequence[str],
            lengths: Sequence[int]) -> dict[str, np.ndarray]:
  """Left-padded prompts with each row's tail tokens appended, padded again to the smallest bucket that fits."""
  extra = tokenizer(list(tails), add_special_tokens=False)["input_ids"]
  ids = [row[mask.astype(bool)].tolist() + list(tail)
         for row, mask, tail in zip(tokens["input_ids"], tokens["attention_mask"], extra)]
  longest, buckets = max(len(x) for x in ids), sorted(int(b) for b in lengths)
  if longest > buckets[-1]:
    raise ValueError(f"prompt + answer prefix of {longest} tokens exceeds the largest length bucket {buckets[-1]} "
                     "(config calibrate.prompt_lengths; the prefix is at most calibrate.describe_max_tokens tokens)")
  length = next(b for b in buckets if b >= longest)
  input_ids = np.full((len(ids), length), tokenizer.pad_token_id, np.int32)
  attention_mask = np.zeros((len(ids), length), np.int32)
  for row, x in enumerate(ids):
    input_ids[row, length - len(x):] = x
    attention_mask[row, length - len(x):] = 1
  return {"input_ids": input_ids, "attention_mask": attention_mask}


def _fill(items: list, size: int) -> list:
  """items padded to `size` by repeating the last one: every call has the same batch shape (one compilation)."""
  return items + [items[-1]] * (size - len(items))


def _greedy_texts(sampler: Any, tokenizer: Any, items: list, load: Callable, encode_cfg: pipeline.EncodeConfig,
                  lengths: Sequence[int], batch_size: int, max_new_tokens: int) -> list[str]:
  """What F writes (greedy) after each (prompt, images), in batches of batch_size."""
  texts: list[str] = []
  for start in range(0, len(items), batch_size):
    chunk = items[start:start + batch_size]
    rows = _fill(chunk, batch_size)
    out = sampler.generate(**build_inputs(tokenizer, [p for p, _ in rows], [i for _, i in rows], load, encode_cfg,
                                          lengths), max_new_tokens=max_new_tokens)
    texts += sampler.decode_text(out)[:len(chunk)]
  return texts


def yes_probability(sampler: Any, tokenizer: Any, prompt_texts: Sequence[str], image_lists: Sequence[Sequence[str]],
                    *, load: Callable, encode_cfg: pipeline.EncodeConfig, lengths: Sequence[int], batch_size: int,
                    answer_words: Sequence[str] = ("no", "yes"), reasoning: str = "direct",
                    max_new_tokens: int = 64) -> Decisions:
  """P(yes) of each prompt (chat prompt ending with the assistant header, with its images), by `reasoning` (module
  doc). `sampler`: a generate.Sampler (generate, decode_text, score_candidates)."""
  n = len(prompt_texts)
  if len(image_lists) != n:
    raise ValueError(f"{n} prompts but {len(image_lists)} image lists")
  if batch_size < 1 or max_new_tokens < 1:
    raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
  candidates = answer_token_ids(tokenizer, answer_words, reasoning)
  items = list(zip(prompt_texts, image_lists))

  def score(chosen: list, tails: Optional[list]) -> np.ndarray:
    out = []
    for start in range(0, len(chosen), batch_size):
      chunk = chosen[start:start + batch_size]
      rows = _fill(chunk, batch_size)
      inputs = build_inputs(tokenizer, [p for p, _ in rows], [i for _, i in rows], load, encode_cfg, lengths,
                            None if tails is None else _fill(tails[start:start + batch_size], batch_size))
      scores = sampler.score_candidates(**inputs, candidate_ids=candidates)
      out.append(np.exp(np.asarray(scores.log_probs, np.float64)[:len(chunk), 1]))
    return np.concatenate(out) if out else np.zeros((0,))

  if reasoning == "direct":
    return Decisions(score(items, None), (None,) * n, np.zeros((n,), bool))
  texts = _greedy_texts(sampler, tokenizer, items, load, encode_cfg, lengths, batch_size, max_new_tokens)
  prefixes = [prefix_through_marker(t) for t in texts]
  decided = [k for k, p in enumerate(prefixes) if p is not None]
  p_yes = np.zeros((n,), np.float64)
  if decided:
    p_yes[decided] = score([items[k] for k in decided], [prefixes[k] for k in decided])
  return Decisions(p_yes, tuple(texts), np.asarray([p is None for p in prefixes], bool).reshape(n))


def two_turn_yes_probability(sampler: Any, tokenizer: Any, first_turns: Sequence[tuple[str, Sequence[str]]],
                             second_turn: Callable[[int, str], tuple[str, Sequence[str]]], *, load: Callable,
                             encode_cfg: pipeline.EncodeConfig, lengths: Sequence[int], batch_size: int,
                             answer_words: Sequence[str] = ("no", "yes"), max_new_tokens: int = 64) -> Decisions:
  """P(yes) of conversations in two turns (describe reasoning): F answers each first turn (prompt, images) greedily;
  `second_turn(k, F's answer to first_turns[k])` gives item k's conversation continued by its second turn (prompt,
  images), which is then decided as yes_probability(reasoning="describe") decides. Equal first turns are decoded
  once. Texts are F's two answers, one per line."""
  distinct = list(dict.fromkeys((p, tuple(i)) for p, i in first_turns))
  decoded = dict(zip(distinct, _greedy_texts(sampler, tokenizer, distinct, load, encode_cfg, lengths, batch_size,
                                             max_new_tokens)))
  firsts = [decoded[(p, tuple(i))].strip() for p, i in first_turns]
  seconds = [second_turn(k, text) for k, text in enumerate(firsts)]
  d = yes_probability(sampler, tokenizer, [p for p, _ in seconds], [i for _, i in seconds], load=load,
                      encode_cfg=encode_cfg, lengths=lengths, batch_size=batch_size, answer_words=answer_words,
                      reasoning="describe", max_new_tokens=max_new_tokens)
  return Decisions(d.p_yes, tuple(f"{a}\n{b}" for a, b in zip(firsts, d.texts)), d.no_marker)
