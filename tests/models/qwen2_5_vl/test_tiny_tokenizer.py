"""The tiny offline tokenizer: pinned special ids, byte-level round trips, chat template, save / reload."""

import pytest
from transformers import AutoTokenizer

from recall_jax.models.qwen2_5_vl import tiny_tokenizer
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import TINY_TOKEN_IDS, TINY_VOCAB_SIZE, build_tiny_tokenizer

TEXTS = [
    "Modify this image with <a red dress>\nRepresent the modified image in one word:",
    "  spaces,\ttabs\r\nand UPPER-case 12345 -- punctuation!? 's 're",
    "non-ascii: café, naïve, 日本語, emoji \U0001F600",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
  return build_tiny_tokenizer()


def test_special_tokens_at_pinned_ids(tokenizer):
  assert TINY_VOCAB_SIZE == 512
  assert TINY_TOKEN_IDS["<|endoftext|>"] == 256 and TINY_TOKEN_IDS["<|video_pad|>"] == 269
  assert sorted(TINY_TOKEN_IDS.values()) == list(range(256, 270))
  for token, token_id in TINY_TOKEN_IDS.items():
    assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
  assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 258
  assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 256


def test_vocab_layout(tokenizer):
  vocab = tokenizer.get_vocab()
  assert max(vocab.values()) < TINY_VOCAB_SIZE
  assert sorted(vocab.values()) == list(range(len(vocab)))  # dense: bytes, specials, then merges
  # Byte symbols in GPT-2 order, as in the real Qwen vocabulary.
  assert vocab["!"] == 0 and vocab["Ġ"] == 220 and vocab["Ċ"] == 198
  assert len(vocab) > tiny_tokenizer.FIRST_MERGE_ID  # some merges exist


def test_merges_make_word_tokens(tokenizer):
  ids = tokenizer.encode(" the image", add_special_tokens=False)
  assert tokenizer.convert_ids_to_tokens(ids) == ["Ġthe", "Ġimage"]
  assert all(i >= tiny_tokenizer.FIRST_MERGE_ID for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tokenizer, text):
  ids = tokenizer.encode(text, add_special_tokens=False)
  assert all(0 <= i < TINY_VOCAB_SIZE for i in ids)
  assert tokenizer.decode(ids) == text


def test_specials_inside_text_are_single_tokens(tokenizer):
  text = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>hi<|im_end|>\n"
  ids = tokenizer.encode(text, add_special_tokens=False)
  assert ids[:1] == [257] and ids[3:7] == [265, 268, 268, 266] and 258 in ids
  assert tokenizer.decode(ids) == text


def test_chat_template_matches_qwen2_vl(tokenizer):
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
  got = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert got == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n")
  two = [{"role": "system", "content": "S"},
         {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "T"}]}]
  got = tokenizer.apply_chat_template(two, tokenize=False, add_generation_prompt=False, add_vision_id=True)
  assert got == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|>"
                 "<|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>T<|im_end|>\n")


def test_save_and_reload_is_identical(tokenizer, tmp_path):
  build_tiny_tokenizer(str(tmp_path))
  reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
  assert reloaded.get_vocab() == tokenizer.get_vocab()
  assert reloaded.chat_template == tokenizer.chat_template == tiny_tokenizer.QWEN2_VL_CHAT_TEMPLATE
  assert (reloaded.eos_token_id, reloaded.pad_token_id) == (258, 256)
  for text in TEXTS + ["<|im_start|>assistant\n<|endoftext|>"]:
    assert reloaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
  for token, token_id in TINY_TOKEN_IDS.items():
    assert reloaded.convert_tokens_to_ids(token) == token_id
