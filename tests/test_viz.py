"""Contact sheets are real pictures: size follows the rows, hits are framed green and misses red."""

import numpy as np
from PIL import Image

from recall_jax import viz


def test_retrieval_sheet_frames_hits_green_and_misses_red(tmp_path):
  colours = {"a": (0, 0, 255), "b": (255, 255, 0), "c": (0, 255, 255)}
  load = lambda name: Image.new("RGB", (50, 40), colours[name])
  path = viz.retrieval_sheet(
      [{"reference": "a", "text": "make it yellow", "ranked": ["b", "c"], "targets": ["b"]},
       {"reference": "a", "text": "make it cyan", "ranked": ["b", "c"], "targets": ["c"]}],
      load, str(tmp_path / "sheet.png"), top_k=2, thumb=64, title="demo")
  img = np.asarray(Image.open(path).convert("RGB"))
  assert img.shape[0] > 2 * 64 and img.shape[1] > 260 + 3 * 64
  # Frame pixels of the first retrieved image in row 1 (a hit) are green, in row 2 (a miss) red.
  x = 260 + 1 * (64 + 6) - 2
  y1 = 24 + 6 + 32
  y2 = y1 + 64 + 28 + 6
  assert tuple(img[y1, x]) == viz.GREEN
  assert tuple(img[y2, x]) == viz.RED
