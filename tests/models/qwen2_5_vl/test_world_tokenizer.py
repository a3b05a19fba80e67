"""The world tokenizer: a BPE trained on the synthetic world's training text, in the tiny id layout."""

import pytest
from transformers import AutoTokenizer

from recall_jax.data import prompts
from recall_jax.data.synthetic import generate_world
from recall_jax.stages.tokenizer_corpus import world_corpus
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import FIRST_MERGE_ID, TINY_TOKEN_IDS, build_tiny_tokenizer
from recall_jax.models.qwen2_5_vl.world_tokenizer import build_world_tokenizer

TEXTS = [
    "Change the style of this dress to <is red with long sleeves and make it dotted>",
    '{"segments": [{"original": "is red", "new": "is blue"}]}',
    "non-ascii: café, 日本語, emoji \U0001F600 and UPPER-case 12345 -- punctuation!?",
    "",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("world_for_tokenizer")
  generate_world(root, scale={"fashioniq": {"train": 12, "val": 2, "test": 1}, "cirr": {"train": 12, "val": 2,
                                                                                           "test1": 1}},
                 layouts=("fashioniq", "cirr"), image_size=56, seed=0)
  return world_corpus(str(root))


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
  path = tmp_path_factory.mktemp("world_tokenizer")
  build_world_tokenizer(corpus, 1024, save_dir=str(path))
  return AutoTokenizer.from_pretrained(str(path))  # what a checkpoint directory gives


def test_corpus_holds_no_special_tokens(corpus):
  assert corpus and not any(t in text for text in corpus for t in TINY_TOKEN_IDS)


def test_special_tokens_and_layout(tokenizer):
  for token, token_id in TINY_TOKEN_IDS.items():
    assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
  assert tokenizer.eos_token_id == TINY_TOKEN_IDS["<|im_end|>"]
  assert tokenizer.pad_token_id == TINY_TOKEN_IDS["<|endoftext|>"]
  vocab = tokenizer.get_vocab()
  assert sorted(vocab.values()) == list(range(len(vocab))) and len(vocab) <= 1024
  assert vocab["!"] == 0 and vocab["Ġ"] == 220  # byte symbols in GPT-2 order, as the tiny tokenizer
  assert len(vocab) > FIRST_MERGE_ID + 100  # it learned merges


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
  ids = tokenizer.encode(text, add_special_tokens=False)
  assert tokenizer.decode(ids) == text


def test_world_words_are_single_tokens(tokenizer):
  for word in (" sleeves", " dress", " red", " collar", " segments"):
    assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word


def test_shorter_than_the_byte_tokenizer(tokenizer, corpus):
  tiny = build_tiny_tokenizer()
  text = corpus[len(corpus) // 2]
  assert len(tokenizer.encode(text)) * 2 < len(tiny.encode(text))


def test_chat_template_matches_the_prompt_builder(tokenizer):
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}]
  rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, add_vision_id=True)
  assert rendered == prompts.chat_prompt(None, prompts.picture_content(1, "Is it red?"), add_vision_id=True)


def test_deterministic_in_the_corpus(corpus, tokenizer):
  again = build_world_tokenizer(list(reversed(corpus)), 1024)  # order does not matter either
  assert again.get_vocab() == tokenizer.get_vocab()
  other = build_world_tokenizer(corpus[: len(corpus) // 3], 1024)
  assert other.get_vocab() != tokenizer.get_vocab()
