"""The embedding model: last-token pooling for both paddings, and the user API equals the model's own forward."""

import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from recall_jax import embed
from recall_jax.data import pipeline, prompts
from recall_jax.data.image import ImageBuckets
from recall_jax.models import qwen2_5_vl
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import build_tiny_tokenizer


def test_pool_last_token_left_and_right_padding():
  hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  left = jnp.array([[0, 1, 1, 1], [0, 0, 1, 1]])
  right = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(embed.pool_last_token(hidden, left), hidden[:, 3])
  np.testing.assert_array_equal(embed.pool_last_token(hidden, right), jnp.stack([hidden[0, 2], hidden[1, 1]]))


def _images(n, seed=0):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 255, (60 + 10 * i, 80, 3), dtype=np.uint8)) for i in range(n)]


def test_embedder_matches_model_forward_at_the_appended_token():
  model = qwen2_5_vl.Qwen25VLModel(qwen2_5_vl.tiny_config(), rngs=nnx.Rngs(0))
  tok = build_tiny_tokenizer()
  enc = pipeline.EncodeConfig(image_buckets=ImageBuckets.square(56), query_lengths=(256,), target_lengths=(128,))
  embedder = embed.Embedder(model, tok, dataset="cirr", encode=enc, batch_size=2)
  images = _images(3)
  texts = ["make it red", "is striped with long sleeves", "has no sleeves"]
  got = embedder.encode_query(images, texts)
  assert got.shape == (3, 64) and got.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

  # Reference: one prompt at a time, no padding, through the model's public __call__.
  for i, (image, text) in enumerate(zip(images, texts)):
    pixels, grid = pipeline.encode_images([image], enc)
    prompt = prompts.expand_image_pads(prompts.query_prompt("cirr", (text,)), [int(np.prod(grid[0])) // 4])
    ids = np.asarray([tok(prompt)["input_ids"]])
    assert ids[0, -1] == tok.convert_tokens_to_ids("<|endoftext|>")
    out = model(input_ids=ids, pixel_values=pixels[0], image_grid_thw=grid)
    want = np.asarray(out.hidden_states[0, -1])
    np.testing.assert_allclose(got[i], want / np.linalg.norm(want), atol=2e-5)

  gallery = embedder.encode_target(images)
  idx, scores = embedder.search(gallery[:2], gallery, k=3)
  assert list(idx[:, 0]) == [0, 1] and np.allclose(scores[:, 0], 1.0, atol=1e-5)
