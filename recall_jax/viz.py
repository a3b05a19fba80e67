"""Contact sheets: results people look at (retrievals, mined failures, generated texts) as PNG pictures."""

from __future__ import annotations

import os
import textwrap
from typing import Callable, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

GREEN, RED, GREY = (40, 170, 60), (210, 50, 50), (150, 150, 150)


def _font(size: int = 12) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without sized default fonts
    return ImageFont.load_default()


def contact_sheet_rows(
    rows: Sequence[dict],
    load: Callable[[str], Image.Image],
    path: str,
    *,
    thumb: int = 96,
    text_width: int = 260,
    title: str = "",
) -> str:
  """Writes a PNG with one row per item.

  Each row dict has: "text" (shown left, wrapped), "images": list of (name, label, border) where border is one of
  "ok" (green), "bad" (red), None (grey); the first image is usually the reference. Returns the path written.
  """
  font = _font(12)
  pad, label_h = 6, 28
  ncols = max(len(r["images"]) for r in rows) if rows else 0
  width = text_width + ncols * (thumb + pad) + pad
  head = 24 if title else 0
  row_h = thumb + label_h + pad
  sheet = Image.new("RGB", (width, head + len(rows) * row_h + pad), "white")
  draw = ImageDraw.Draw(sheet)
  if title:
    draw.text((pad, 4), title, fill="black", font=_font(14))
  for r, row in enumerate(rows):
    y = head + r * row_h + pad
    # Wrap line by line: explicit newlines (e.g. original vs new text) stay visible.
    wrapped = "\n".join(textwrap.fill(line, width=max(10, text_width // 7)) for line in row["text"].split("\n"))
    draw.multiline_text((pad, y), wrapped, fill="black", font=font, spacing=2)
    for c, (name, label, border) in enumerate(row["images"]):
      x = text_width + c * (thumb + pad)
      img = load(name).convert("RGB")
      img.thumbnail((thumb, thumb))
      colour = {"ok": GREEN, "bad": RED}.get(border, GREY)
      draw.rectangle([x - 3, y - 3, x + thumb + 2, y + thumb + 2], outline=colour, width=3)
      sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
      if label:
        chars = max(8, thumb // 6)
        shown = label if len(label) <= chars else label[:chars - 1] + "…"
        draw.text((x, y + thumb + 4), shown, fill="black", font=font)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  sheet.save(tmp)
  os.replace(tmp, path)
  return path


def retrieval_sheet(
    queries: Sequence[dict],
    load: Callable[[str], Image.Image],
    path: str,
    *,
    top_k: int = 5,
    thumb: int = 96,
    title: str = "",
) -> str:
  """Retrievals: per query {"reference", "text", "ranked": [names], "targets": [names]}; hits framed green."""
  rows = []
  for q in queries:
    targets = set(q.get("targets", ()))
    images = [(q["reference"], "reference", None)]
    for rank, name in enumerate(q["ranked"][:top_k], start=1):
      images.append((name, f"#{rank} {name}", "ok" if name in targets else "bad"))
    rows.append({"text": q["text"], "images": images})
  return contact_sheet_rows(rows, load, path, thumb=thumb, title=title)


def triplet_sheet(items: Sequence[dict], load: Callable[[str], Image.Image], path: str, *, title: str = "",
                  extra_key: Optional[str] = None) -> str:
  """Triplets or mined failures: per item {"reference", "text", "images": [(name, label, border)], ...}."""
  rows = [{"text": it["text"] + (f"\n{it[extra_key]}" if extra_key and it.get(extra_key) else ""),
           "images": [(it["reference"], "reference", None), *it["images"]]} for it in items]
  return contact_sheet_rows(rows, load, path, title=title)
