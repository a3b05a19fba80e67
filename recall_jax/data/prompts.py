"""Retrieval instructions, Qwen chat-format prompts, image-pad expansion and length-bucketed tokenization.

The prompt strings are part of the retrieval protocol (the paper's fixed instruction per side): training and evaluation must use the same
ones, so they live here as constants. `chat_prompt` renders exactly what Qwen2-VL's chat template renders for the
same messages (tests check it against `tokenizer.apply_chat_template`); an embedding prompt ends with the assistant
header followed by `POOL_TOKEN`, whose final hidden state is the embedding.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
# The token appended after the assistant header of an embedding prompt; its hidden state is pooled.
POOL_TOKEN = "<|endoftext|>"

# The system turn Qwen2.5-VL's chat template inserts when a conversation has none. Qwen3-VL's inserts none, so the
# generation prompts name this turn explicitly: both families' templates then render the same text.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# ReCALL's embedding system prompt (paper appendix): casts the model as a retrieval encoder.
RETRIEVAL_SYSTEM_PROMPT = ("You are a multimodal retrieval encoder. Your sole function is to map any input into a "
                           "compact embedding for nearest-neighbor retrieval.")

CIRR_QUERY_INSTRUCTION = "Modify this image with <{caption}>\nRepresent the modified image in one word:"
FASHIONIQ_QUERY_INSTRUCTION = ("Change the style of this {category} to <{caption}>\n"
                               "Represent the modified {category} in one word:")
TARGET_INSTRUCTION = "Represent the given image in one word:"

# Query instruction per dataset layout; CIRCO (zero-shot, open domain) uses the CIRR wording.
QUERY_INSTRUCTIONS = {
    "cirr": CIRR_QUERY_INSTRUCTION,
    "circo": CIRR_QUERY_INSTRUCTION,
    "fashioniq": FASHIONIQ_QUERY_INSTRUCTION,
}

# How several captions (FashionIQ has two) become one modification text:
#   "and":      raw "c1 and c2" (ReCALL's code and the method doc's default);
#   "clip4cir": CLIP4Cir / SPRC style, "C1 and c2" with ".?, " stripped from both ends and the first capitalised.
CAPTION_JOINS = ("and", "clip4cir")


def join_captions(captions: Sequence[str], caption_join: str = "and") -> str:
  """One modification text from a query's caption(s), by the protocol `caption_join`."""
  if isinstance(captions, str):
    raise TypeError(f"captions must be a sequence of strings, got the string {captions!r}")
  if not captions:
    raise ValueError("a query needs at least one caption")
  if caption_join == "and":
    return " and ".join(captions)
  if caption_join == "clip4cir":
    stripped = [c.strip(".?, ") for c in captions]
    return " and ".join([stripped[0].capitalize(), *stripped[1:]])
  raise ValueError(f"unknown caption_join {caption_join!r}; expected one of {CAPTION_JOINS}")


def query_instruction(dataset: str, captions: Sequence[str], category: Optional[str] = None, *,
                      caption_join: str = "and") -> str:
  """The retrieval instruction of a composed query (the text after the reference image)."""
  if dataset not in QUERY_INSTRUCTIONS:
    raise ValueError(f"no query instruction for dataset {dataset!r}; known: {sorted(QUERY_INSTRUCTIONS)}")
  caption = join_captions(captions, caption_join)
  if dataset == "fashioniq":
    if not category:
      raise ValueError("FashionIQ query instructions need the category (dress / shirt / toptee)")
    return FASHIONIQ_QUERY_INSTRUCTION.format(category=category, caption=caption)
  return QUERY_INSTRUCTIONS[dataset].format(caption=caption)


def _render_content(content: Sequence[Mapping[str, Any]], add_vision_id: bool) -> str:
  """User content items -> text, as the chat template renders them."""
  parts, image_index = [], 0
  for i, item in enumerate(content):
    kind = item.get("type")
    if kind == "image":
      image_index += 1
      parts.append((f"Picture {image_index}: " if add_vision_id else "") + IMAGE_PLACEHOLDER)
    elif kind == "text":
      text = item.get("text")
      if not isinstance(text, str):
        raise ValueError(f"content item {i} is a text item without a string 'text': {item!r}")
      parts.append(text)
    else:
      raise ValueError(f"content item {i} must have type 'image' or 'text', got {item!r}")
  return "".join(parts)


def chat_prompt(system: Optional[str], user_content: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = True, append_eos_token: bool = False,
                add_vision_id: bool = False) -> str:
  """A one-turn Qwen chat prompt: system turn, user turn, optional assistant header, optional POOL_TOKEN.

  system:           the system message; None gives the template's default system turn.
  user_content:     [{"type": "image"}, {"type": "text", "text": ...}, ...] in order.
  append_eos_token: append POOL_TOKEN (Qwen's <|endoftext|>), the token an embedding is pooled from.
  add_vision_id:    prefix each image with "Picture k: ", as the template's `add_vision_id` does.
  """
  system = DEFAULT_SYSTEM_PROMPT if system is None else system
  user = _render_content(user_content, add_vision_id)
  prompt = f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{user}{IM_END}\n"
  if add_generation_prompt:
    prompt += f"{IM_START}assistant\n"
  if append_eos_token:
    prompt += POOL_TOKEN
  return prompt


def follow_up_prompt(prompt: str, answer: str, text: str, picture: int) -> str:
  """A generation prompt continued by one more exchange, as Qwen's chat template renders a conversation: `prompt`
  (ending with the assistant header), the assistant's `answer` and <|im_end|>, then a user turn "Picture <picture>:
  <image><text>" (`picture` continues the conversation's image numbering), then the assistant header."""
  if not prompt.endswith(f"{IM_START}assistant\n"):
    raise ValueError("a follow-up continues a generation prompt, which ends with the assistant header")
  return (f"{prompt}{answer}{IM_END}\n{IM_START}user\nPicture {picture}: {IMAGE_PLACEHOLDER}{text}{IM_END}\n"
          f"{IM_START}assistant\n")


def picture_content(num_images: int, text: str) -> list[dict[str, str]]:
  """User content with `num_images` images followed by `text` (render with add_vision_id for "Picture k: ")."""
  if num_images < 1:
    raise ValueError(f"num_images must be >= 1, got {num_images}")
  return [{"type": "image"}] * num_images + [{"type": "text", "text": text}]


def multi_image_prompt(text: str, num_images: int, system: Optional[str] = None) -> str:
  """Generation prompt "Picture 1: <image>Picture 2: <image>...<text>" ending with the assistant header."""
  return chat_prompt(system, picture_content(num_images, text), add_generation_prompt=True, add_vision_id=True)


def embedding_prompt(instruction: str, system: str = RETRIEVAL_SYSTEM_PROMPT) -> str:
  """Image + instruction user turn, assistant header, then POOL_TOKEN (the pooled position)."""
  return chat_prompt(system, [{"type": "image"}, {"type": "text", "text": instruction}],
                     add_generation_prompt=True, append_eos_token=True)


def query_prompt(dataset: str, captions: Sequence[str], category: Optional[str] = None, *,
                 caption_join: str = "and", system: str = RETRIEVAL_SYSTEM_PROMPT) -> str:
  """Embedding prompt of a composed query (reference image + its modification instruction)."""
  return embedding_prompt(query_instruction(dataset, captions, category, caption_join=caption_join), system)


def target_prompt(system: str = RETRIEVAL_SYSTEM_PROMPT) -> str:
  """Embedding prompt of a gallery / target image."""
  return embedding_prompt(TARGET_INSTRUCTION, system)


def image_token_counts(image_grid_thw: np.ndarray, merge_size: int = 2) -> list[int]:
  """Merged visual tokens per image: grid_t * grid_h * grid_w // merge_size**2."""
  grid = np.asarray(image_grid_thw)
  if grid.ndim != 2 or grid.shape[1] != 3:
    raise ValueError(f"image_grid_thw must have shape (n_images, 3), got {grid.shape}")
  return [int(n) // merge_size**2 for n in grid.prod(axis=1)]


def expand_image_pads(prompt: str, image_token_counts: Sequence[int]) -> str:
  """Replaces the k-th <|image_pad|> of `prompt` by image_token_counts[k] copies of it."""
  pieces = prompt.split(IMAGE_PAD)
  if len(pieces) - 1 != len(image_token_counts):
    raise ValueError(f"prompt has {len(pieces) - 1} {IMAGE_PAD} but {len(image_token_counts)} image token counts "
                     "were given")
  out = [pieces[0]]
  for count, piece in zip(image_token_counts, pieces[1:]):
    if count < 1:
      raise ValueError(f"image token counts must be >= 1, got {list(image_token_counts)}")
    out.append(IMAGE_PAD * int(count))
    out.append(piece)
  return "".join(out)


def tokenize_batch(tokenizer: Any, prompts: Sequence[str], image_token_counts: Sequence[Sequence[int]],
                   length_buckets: Sequence[int], padding_side: str = "left") -> dict[str, np.ndarray]:
  """Expands image pads, tokenizes, and pads every prompt to the smallest length bucket that fits them all.

  image_token_counts[i]: the merged-token count of each image of prompt i, in order (see `image_token_counts`).
  Returns dict(input_ids int32 (B, L), attention_mask int32 (B, L)); padding uses the tokenizer's pad token.
  """
  if padding_side not in ("left", "right"):
    raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
  if len(prompts) != len(image_token_counts):
    raise ValueError(f"{len(prompts)} prompts but {len(image_token_counts)} image token count lists")
  if not prompts:
    raise ValueError("tokenize_batch needs at least one prompt")
  buckets = sorted(int(b) for b in length_buckets)
  if not buckets or buckets[0] < 1:
    raise ValueError(f"length_buckets must be positive lengths, got {list(length_buckets)}")
  if tokenizer.pad_token_id is None:
    raise ValueError("the tokenizer has no pad token")
  texts = [expand_image_pads(p, c) for p, c in zip(prompts, image_token_counts)]
  ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
  longest = max(len(x) for x in ids)
  if longest > buckets[-1]:
    too_long = [(i, len(x)) for i, x in enumerate(ids) if len(x) > buckets[-1]]
    raise ValueError(f"prompt(s) (index, tokens) {too_long} exceed the largest length bucket {buckets[-1]}")
  length = next(b for b in buckets if b >= longest)
  input_ids = np.full((len(ids), length), tokenizer.pad_token_id, np.int32)
  attention_mask = np.zeros((len(ids), length), np.int32)
  for row, x in enumerate(ids):
    span = slice(length - len(x), length) if padding_side == "left" else slice(0, len(x))
    input_ids[row, span] = x
    attention_mask[row, span] = 1
  return {"input_ids": input_ids, "attention_mask": attention_mask}
