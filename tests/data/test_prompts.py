"""Prompts: instructions, chat format vs the chat template, image-pad expansion, tokenization vs the HF processor."""

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

from recall_jax.data import image as image_lib
from recall_jax.data import prompts
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import TINY_TOKEN_IDS, build_tiny_tokenizer


class ImageOnlyQwen25VLProcessor(Qwen2_5_VLProcessor):
  """The stock processor without a video processor (it would need torchvision)."""

  def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
    super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
  return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
  return ImageOnlyQwen25VLProcessor(Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=147456), tokenizer)


def _image(height, width, seed):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_instructions_are_the_method_doc_strings():
  assert prompts.query_instruction("cirr", ("is red",)) == (
      "Modify this image with <is red>\nRepresent the modified image in one word:")
  assert prompts.query_instruction("fashioniq", ("is red", "has sleeves"), "dress") == (
      "Change the style of this dress to <is red and has sleeves>\nRepresent the modified dress in one word:")
  assert prompts.TARGET_INSTRUCTION == "Represent the given image in one word:"
  assert prompts.query_instruction("circo", ("a dog",)) == prompts.query_instruction("cirr", ("a dog",))


def test_caption_joins():
  captions = ("is shinier.", " and longer ")
  assert prompts.join_captions(captions) == "is shinier. and  and longer "
  assert prompts.join_captions(captions, "clip4cir") == "Is shinier and and longer"
  with pytest.raises(ValueError, match="caption_join"):
    prompts.join_captions(captions, "both")
  with pytest.raises(TypeError):
    prompts.join_captions("a caption string")


def test_query_instruction_errors():
  with pytest.raises(ValueError, match="category"):
    prompts.query_instruction("fashioniq", ("x", "y"))
  with pytest.raises(ValueError, match="no query instruction for dataset 'coco'"):
    prompts.query_instruction("coco", ("x",))
  with pytest.raises(ValueError, match="at least one caption"):
    prompts.query_instruction("cirr", ())


@pytest.mark.parametrize("system", [None, "Be brief.", prompts.RETRIEVAL_SYSTEM_PROMPT])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("add_vision_id", [True, False])
def test_chat_prompt_equals_chat_template(tokenizer, system, add_generation_prompt, add_vision_id):
  content = [{"type": "text", "text": "Before. "}, {"type": "image"}, {"type": "text", "text": "Middle\n"},
             {"type": "image"}, {"type": "text", "text": "After?"}]
  messages = ([] if system is None else [{"role": "system", "content": system}]) + [
      {"role": "user", "content": content}]
  expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           add_vision_id=add_vision_id)
  got = prompts.chat_prompt(system, content, add_generation_prompt=add_generation_prompt,
                            add_vision_id=add_vision_id)
  assert got == expected
  assert prompts.chat_prompt(system, content, add_generation_prompt=add_generation_prompt,
                             append_eos_token=True, add_vision_id=add_vision_id) == expected + "<|endoftext|>"


def test_chat_prompt_rejects_bad_content():
  with pytest.raises(ValueError, match="content item 1"):
    prompts.chat_prompt(None, [{"type": "image"}, {"type": "video"}])
  with pytest.raises(ValueError, match="content item 0"):
    prompts.chat_prompt(None, [{"type": "text"}])


def test_multi_image_prompt(tokenizer):
  got = prompts.multi_image_prompt("Rewrite the text.", 2, system="S")
  assert got == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|>"
                 "<|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>Rewrite the text.<|im_end|>\n"
                 "<|im_start|>assistant\n")
  messages = [{"role": "system", "content": "S"},
              {"role": "user", "content": prompts.picture_content(2, "Rewrite the text.")}]
  assert got == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                              add_vision_id=True)


def test_embedding_prompts_end_with_pooled_token(tokenizer):
  query = prompts.query_prompt("fashioniq", ("is blue", "is short"), "shirt")
  target = prompts.target_prompt()
  for prompt, instruction in [(query, prompts.query_instruction("fashioniq", ("is blue", "is short"), "shirt")),
                              (target, prompts.TARGET_INSTRUCTION)]:
    assert prompt == (f"<|im_start|>system\n{prompts.RETRIEVAL_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                      f"<|vision_start|><|image_pad|><|vision_end|>{instruction}<|im_end|>\n"
                      "<|im_start|>assistant\n<|endoftext|>")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[-1] == TINY_TOKEN_IDS["<|endoftext|>"]
    assert ids[-4:-1] == [TINY_TOKEN_IDS["<|im_start|>"], *tokenizer.encode("assistant\n")]
    assert ids.count(TINY_TOKEN_IDS["<|image_pad|>"]) == 1


def test_expand_image_pads():
  prompt = "a<|image_pad|>b<|image_pad|>c"
  assert prompts.expand_image_pads(prompt, [2, 3]) == "a" + "<|image_pad|>" * 2 + "b" + "<|image_pad|>" * 3 + "c"
  with pytest.raises(ValueError, match="2 <\\|image_pad\\|> but 1"):
    prompts.expand_image_pads(prompt, [2])
  with pytest.raises(ValueError, match=">= 1"):
    prompts.expand_image_pads(prompt, [2, 0])
  grid = np.array([[1, 8, 4], [1, 24, 24]])
  assert prompts.image_token_counts(grid) == [8, 144]


def _batch_inputs():
  images = [[_image(100, 60, 0)], [_image(30, 500, 1), _image(900, 700, 2)], [_image(20, 20, 3)]]
  texts = [prompts.query_prompt("cirr", ("has two dogs",)),
           prompts.multi_image_prompt("Does Picture 2 match? Answer yes or no.", 2),
           prompts.target_prompt()]
  return images, texts


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_tokenize_batch_matches_hf_processor(tokenizer, processor, padding_side):
  images, texts = _batch_inputs()
  flat = [im for row in images for im in row]
  _, grid = image_lib.preprocess_images(flat)
  counts = prompts.image_token_counts(grid)
  per_prompt = [counts[0:1], counts[1:3], counts[3:4]]
  batch = prompts.tokenize_batch(tokenizer, texts, per_prompt, [64, 256, 1024], padding_side=padding_side)
  ref = processor(images=flat, text=texts, padding=True, padding_side=padding_side, return_tensors="np")
  ref_ids, ref_mask = np.asarray(ref["input_ids"]), np.asarray(ref["attention_mask"])
  np.testing.assert_array_equal(np.asarray(ref["image_grid_thw"]), grid)
  assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
  assert batch["input_ids"].shape == (3, 1024) and ref_ids.shape[1] <= 1024
  extra = 1024 - ref_ids.shape[1]
  pad = np.full((3, extra), tokenizer.pad_token_id)
  if padding_side == "left":
    want_ids, want_mask = np.concatenate([pad, ref_ids], 1), np.concatenate([0 * pad, ref_mask], 1)
  else:
    want_ids, want_mask = np.concatenate([ref_ids, pad], 1), np.concatenate([ref_mask, 0 * pad], 1)
  np.testing.assert_array_equal(batch["input_ids"], want_ids)
  np.testing.assert_array_equal(batch["attention_mask"], want_mask)


def test_tokenize_batch_padding_and_bucket_choice(tokenizer):
  texts = ["<|im_start|>", "<|im_start|>user\nhello<|vision_start|><|image_pad|><|vision_end|>"]
  counts = [[], [5]]
  lengths = [len(tokenizer.encode(prompts.expand_image_pads(t, c))) for t, c in zip(texts, counts)]
  assert lengths[0] == 1 and lengths[1] > 5
  exact = prompts.tokenize_batch(tokenizer, texts, counts, [lengths[1]])
  assert exact["input_ids"].shape == (2, lengths[1])
  left = prompts.tokenize_batch(tokenizer, texts, counts, [32, 4, 16])  # buckets in any order
  assert left["input_ids"].shape == (2, 16)
  np.testing.assert_array_equal(left["attention_mask"].sum(1), lengths)
  assert left["attention_mask"][0].tolist() == [0] * 15 + [1]
  assert left["input_ids"][0].tolist() == [256] * 15 + [257]
  right = prompts.tokenize_batch(tokenizer, texts, counts, [16, 32], padding_side="right")
  assert right["attention_mask"][0].tolist() == [1] + [0] * 15
  assert right["input_ids"][0].tolist() == [257] + [256] * 15
  np.testing.assert_array_equal(right["input_ids"][1, :lengths[1]], left["input_ids"][1, 16 - lengths[1]:])


def test_tokenize_batch_overflow_names_prompt(tokenizer):
  texts = ["short", "<|vision_start|><|image_pad|><|vision_end|>", "also short"]
  with pytest.raises(ValueError, match=r"\(1, 52\).*largest length bucket 32"):
    prompts.tokenize_batch(tokenizer, texts, [[], [50], []], [8, 32])
  with pytest.raises(ValueError, match="padding_side"):
    prompts.tokenize_batch(tokenizer, texts, [[], [1], []], [8], padding_side="middle")
  with pytest.raises(ValueError, match="3 prompts but 2"):
    prompts.tokenize_batch(tokenizer, texts, [[], [1]], [8])


def test_follow_up_prompt_equals_chat_template_of_the_conversation(tokenizer):
  first = prompts.multi_image_prompt("Describe it.", 1, system="S")
  got = prompts.follow_up_prompt(first, "A red dress.", "And this one?", picture=2)
  messages = [{"role": "system", "content": "S"},
              {"role": "user", "content": prompts.picture_content(1, "Describe it.")},
              {"role": "assistant", "content": "A red dress."},
              {"role": "user", "content": prompts.picture_content(1, "And this one?")}]
  assert got == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                              add_vision_id=True)
  with pytest.raises(ValueError, match="assistant header"):
    prompts.follow_up_prompt(first + "x", "A red dress.", "And this one?", picture=2)
