"""Fresh renders for vision pretraining: a pure function of the seed, training combinations only, every category,
images that show their garments (the same pixels the world would write for that garment and jitter)."""

import io

import numpy as np
from PIL import Image

from recall_jax.data.synthetic import fresh, render
from recall_jax.data.synthetic.attributes import CATEGORIES, HELD_OUT, is_held_out


def test_garments_are_seeded_and_avoid_the_held_out_combinations():
  a, b = fresh.fresh_garments(600, (0, 3)), fresh.fresh_garments(600, (0, 3))
  assert a == b and a != fresh.fresh_garments(600, (1, 3))
  assert HELD_OUT and not any(is_held_out(g) for g in a)
  assert {g.category for g in a} == set(CATEGORIES)


def test_images_are_the_renders_of_their_garments_through_the_file_format():
  images, garments = fresh.render_fresh(4, seed=7, image_size=56, fmt="png")
  again, _ = fresh.render_fresh(4, seed=7, image_size=56, fmt="png")
  assert garments == fresh.fresh_garments(4, 7)
  assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(images, again))
  rng = np.random.default_rng([7, 1])  # render_fresh's jitter stream
  first = render.render(garments[0], render.sample_jitter(rng), 56)
  assert images[0].size == (56, 56) and np.array_equal(np.asarray(images[0]), np.asarray(first))
  jpg, _ = fresh.render_fresh(1, seed=7, image_size=56, fmt="jpg")
  decoded = Image.open(io.BytesIO(render.to_bytes(first, "jpg"))).convert("RGB")
  assert np.array_equal(np.asarray(jpg[0]), np.asarray(decoded))
