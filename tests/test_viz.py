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


def test_long_texts_get_taller_rows_and_never_reach_the_next_row(tmp_path):
  load = lambda name: Image.new("RGB", (50, 40), (0, 0, 255))
  long = "\n".join(f"F read line {i}: Picture 1: a red dress. Picture 2: a blue dress." for i in range(12))
  rows = [{"text": long, "images": [("a", "x", None)]}, {"text": "short", "images": [("a", "y", None)]}]
  path = viz.contact_sheet_rows(rows, load, str(tmp_path / "s.png"), thumb=64, title="t")
  img = np.asarray(Image.open(path).convert("L"))
  # Ink of the long text in the text column ends before the second row's text starts.
  tops = viz.row_tops([viz._wrap(r["text"], 260) for r in rows], viz._font(12), thumb=64, label_h=28, pad=6, head=24)
  inked = np.nonzero((img[:, :250] < 128).any(axis=1))[0]
  second = inked[inked >= tops[1]]
  assert tops[1] - tops[0] > 64 + 28 + 6  # taller than a thumbnail row
  assert second.max() - second.min() < 20  # only "short" (one line) inks the second row's text column
  assert img.shape[0] == tops[-1] + 6
