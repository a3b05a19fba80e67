"""A tiny byte-level Qwen2 tokenizer built offline, for the tiny test / demo checkpoints.

It behaves like the real Qwen2-VL tokenizer (same pre-tokenizer, byte-level BPE, special tokens, chat template, eos
and pad), only with a 512-id vocabulary so tiny models stay tiny:

  ids 0..255    the 256 byte-level symbols, in GPT-2 / Qwen `bytes_to_unicode` order (so any text encodes);
  ids 256..269  the Qwen special tokens at the fixed ids pinned in interfaces.md (`TINY_TOKEN_IDS`);
  ids 270..     BPE merges for a few common English words (the prompt vocabulary), all below `TINY_VOCAB_SIZE`.
"""

from __future__ import annotations

from typing import Optional, Sequence

from transformers import Qwen2Tokenizer

TINY_VOCAB_SIZE = 512

TINY_TOKEN_IDS: dict[str, int] = {
    "<|endoftext|>": 256,
    "<|im_start|>": 257,
    "<|im_end|>": 258,
    "<|object_ref_start|>": 259,
    "<|object_ref_end|>": 260,
    "<|box_start|>": 261,
    "<|box_end|>": 262,
    "<|quad_start|>": 263,
    "<|quad_end|>": 264,
    "<|vision_start|>": 265,
    "<|vision_end|>": 266,
    "<|vision_pad|>": 267,
    "<|image_pad|>": 268,
    "<|video_pad|>": 269,
}

FIRST_MERGE_ID = 270

# Qwen2-VL-Instruct's chat template, verbatim: default system turn, one <|vision_start|><|image_pad|><|vision_end|>
# per image (prefixed "Picture k: " when `add_vision_id` is passed), assistant header for generation prompts.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words that get whole-word merges (a leading space is spelled "Ġ" by the byte-level alphabet). They cover the
# chat headers and the retrieval / calibration prompts, so tiny-model sequences are not all single bytes.
_MERGE_WORDS = (
    "system", "user", "assistant", "You", "Ġare", "Ġa", "Ġthe", "Ġthis", "Ġimage", "Ġin", "Ġone", "Ġword",
    "Ġwith", "Ġand", "Ġto", "Ġof", "Ġis", "Ġit", "Modify", "Represent", "Ġmodified", "Ġgiven", "Change",
    "Ġstyle", "Ġdress", "Ġshirt", "Ġtoptee", "Ġretrieval", "Ġencoder", "Picture", "Ġcolor", "Ġred", "Ġblue",
    "Ġgreen", "Ġyes", "Ġno",
)


def _bytes_to_unicode() -> list[str]:
  """The 256 byte-level symbols in GPT-2 order: printable bytes map to themselves, the rest to 256 + k."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  unprintable = [b for b in range(256) if b not in printable]
  return [chr(c) for c in printable] + [chr(256 + k) for k in range(len(unprintable))]


def _word_chain_merges() -> list[tuple[str, str]]:
  """Left-to-right merge chains spelling each of `_MERGE_WORDS`."""
  merges: list[tuple[str, str]] = []
  seen = set(_bytes_to_unicode())
  for word in _MERGE_WORDS:
    left = word[0]
    for char in word[1:]:
      merged = left + char
      if merged not in seen:
        seen.add(merged)
        merges.append((left, char))
      left = merged
  return merges


def vocab_for(merges: Sequence[tuple[str, str]], vocab_size: int = TINY_VOCAB_SIZE) -> dict[str, int]:
  """Byte symbols (ids 0..255), specials at their pinned ids, then one id per merge result in merge order."""
  vocab = {symbol: i for i, symbol in enumerate(_bytes_to_unicode())}
  vocab.update(TINY_TOKEN_IDS)
  next_id = FIRST_MERGE_ID
  for left, right in merges:
    if left not in vocab or right not in vocab:
      raise ValueError(f"merge {(left, right)} uses a symbol that no earlier merge produced")
    if left + right not in vocab:
      vocab[left + right] = next_id
      next_id += 1
  if next_id > vocab_size:
    raise ValueError(f"{len(merges)} merges need {next_id} ids, more than vocab_size={vocab_size}")
  return vocab


def build_qwen2_tokenizer(merges: Sequence[tuple[str, str]], vocab_size: int = TINY_VOCAB_SIZE,
                          save_dir: Optional[str] = None) -> Qwen2Tokenizer:
  """A Qwen2 (fast) tokenizer over the byte symbols, the pinned specials and `merges`; saved to `save_dir` for
  `AutoTokenizer.from_pretrained` when given."""
  specials = list(TINY_TOKEN_IDS)
  tokenizer = Qwen2Tokenizer(
      vocab=vocab_for(merges, vocab_size),
      merges=list(merges),
      unk_token=None,
      eos_token="<|im_end|>",
      pad_token="<|endoftext|>",
      extra_special_tokens=[t for t in specials if t not in ("<|im_end|>", "<|endoftext|>")],
      chat_template=QWEN2_VL_CHAT_TEMPLATE,
      clean_up_tokenization_spaces=False,
      model_max_length=32768,
  )
  for token, token_id in TINY_TOKEN_IDS.items():
    got = tokenizer.convert_tokens_to_ids(token)
    if got != token_id:
      raise RuntimeError(f"tokenizer put {token} at id {got}, expected the pinned id {token_id}")
  if save_dir is not None:
    tokenizer.save_pretrained(save_dir)
  return tokenizer


def build_tiny_tokenizer(save_dir: Optional[str] = None) -> Qwen2Tokenizer:
  """Builds the tiny Qwen2 (fast) tokenizer; when `save_dir` is given, saves it for `AutoTokenizer.from_pretrained`."""
  return build_qwen2_tokenizer(_word_chain_merges(), TINY_VOCAB_SIZE, save_dir)
