"""Pictures people look at instead of JSON: contact sheets (retrievals, mined failures, generated texts) and the
report's charts (grouped bars, tables) composed into one PNG. PIL only."""

from __future__ import annotations

import io
import textwrap
from typing import Callable, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from recall_jax import files

GREEN, RED, GREY = (40, 170, 60), (210, 50, 50), (150, 150, 150)
# Bar colours of the report's series, in order (baseline first): grey-blue, then warm colours for refined rounds.
SERIES_COLOURS = ((110, 130, 170), (230, 120, 40), (200, 60, 90), (120, 70, 160), (60, 150, 140))


def _font(size: int = 12) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without sized default fonts
    return ImageFont.load_default()


_SPACING = 2  # pixels between wrapped text lines


def _wrap(text: str, text_width: int) -> str:
  """Wraps line by line, so explicit newlines (e.g. original vs new text) stay visible."""
  return "\n".join(textwrap.fill(line, width=max(10, text_width // 7)) for line in text.split("\n"))


def row_tops(texts: Sequence[str], font: ImageFont.ImageFont, *, thumb: int, label_h: int, pad: int,
             head: int) -> list[int]:
  """Top y of each row, then the bottom of the last: a row is as tall as its thumbnails or its text, whichever is
  taller, so long texts (F's readings on calibrated.png) never run into the next row."""
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  tops = [head]
  for text in texts:
    text_h = measure.multiline_textbbox((0, 0), text, font=font, spacing=_SPACING)[3] if text else 0
    tops.append(tops[-1] + max(thumb + label_h, text_h) + pad)
  return tops


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
  texts = [_wrap(row["text"], text_width) for row in rows]
  tops = row_tops(texts, font, thumb=thumb, label_h=label_h, pad=pad, head=head)
  sheet = Image.new("RGB", (width, tops[-1] + pad), "white")
  draw = ImageDraw.Draw(sheet)
  if title:
    draw.text((pad, 4), title, fill="black", font=_font(14))
  for row, wrapped, top in zip(rows, texts, tops):
    y = top + pad
    draw.multiline_text((pad, y), wrapped, fill="black", font=font, spacing=_SPACING)
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
  return save_png(sheet, path)


def save_png(img: Image.Image, path: str) -> str:
  """Writes `img` atomically (a crash never leaves half a picture), on the writing process only (files.py);
  returns the path."""
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return files.atomic_write_bytes(path, buf.getvalue())


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


def bar_chart(title: str, groups: Sequence[str], series: Sequence[tuple[str, Sequence[Optional[float]]]], *,
              y_max: float = 100.0, width: int = 520, height: int = 260, value_format: str = "{:.1f}") -> Image.Image:
  """Grouped vertical bars: one group per entry of `groups`, one bar per (name, values) series; None = no bar
  (drawn as "n/a"). Values are labelled above their bars; a legend names the series."""
  font, small = _font(12), _font(10)
  img = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(img)
  draw.text((8, 4), title, fill="black", font=_font(14))
  left, right, top, bottom = 36, 8, 44, 40
  plot_w, plot_h = width - left - right, height - top - bottom
  for frac in (0.0, 0.5, 1.0):  # axis and two grid lines
    y = top + plot_h - frac * plot_h
    draw.line([left, y, width - right, y], fill=GREY if frac else "black", width=1)
    draw.text((2, y - 6), value_format.format(frac * y_max), fill="black", font=small)
  n_groups, n_series = max(len(groups), 1), max(len(series), 1)
  group_w = plot_w / n_groups
  bar_w = max(2.0, (group_w - 10) / n_series)
  for g, name in enumerate(groups):
    x0 = left + g * group_w + 5
    for k, (_, values) in enumerate(series):
      v = values[g] if g < len(values) else None
      x = x0 + k * bar_w
      if v is None:
        draw.text((x, top + plot_h - 12), "n/a", fill=GREY, font=small)
        continue
      h = max(0.0, min(v / y_max, 1.0)) * plot_h
      draw.rectangle([x, top + plot_h - h, x + bar_w - 2, top + plot_h], fill=SERIES_COLOURS[k % len(
          SERIES_COLOURS)])
      draw.text((x, top + plot_h - h - 11), value_format.format(v), fill="black", font=small)
    label = name if len(name) <= int(group_w // 6) else name[:max(1, int(group_w // 6) - 1)] + "…"
    draw.text((x0, top + plot_h + 4), label, fill="black", font=font)
  x = left
  for k, (name, _) in enumerate(series):  # legend
    draw.rectangle([x, 26, x + 10, 36], fill=SERIES_COLOURS[k % len(SERIES_COLOURS)])
    draw.text((x + 14, 25), name, fill="black", font=small)
    x += 20 + 7 * len(name)
  return img


def table_image(title: str, header: Sequence[str], rows: Sequence[Sequence[object]], *,
                col_width: int = 86, first_col_width: int = 150) -> Image.Image:
  """A plain table: a title, a header row and body rows of short cells (None shown as "-")."""
  font = _font(12)
  row_h, pad = 18, 8
  widths = [first_col_width] + [col_width] * (len(header) - 1)
  img = Image.new("RGB", (sum(widths) + 2 * pad, 28 + row_h * (len(rows) + 1) + pad), "white")
  draw = ImageDraw.Draw(img)
  draw.text((pad, 4), title, fill="black", font=_font(14))
  for r, row in enumerate([header, *rows]):
    y = 26 + r * row_h
    x = pad
    for w, cell in zip(widths, row):
      text = "-" if cell is None else str(cell)
      chars = max(4, w // 7)
      draw.text((x, y), text if len(text) <= chars else text[:chars - 1] + "…", fill="black", font=font)
      x += w
    if r == 0:
      draw.line([pad, y + row_h - 2, sum(widths) + pad, y + row_h - 2], fill="black", width=1)
  return img


def compose(panels: Sequence[Sequence[Image.Image]], path: str, *, title: str = "", pad: int = 10) -> str:
  """Panels in rows (each inner sequence one row, left to right) on one white PNG."""
  rows = [list(r) for r in panels if r]
  head = 28 if title else 0
  width = max([sum(p.width for p in r) + pad * (len(r) + 1) for r in rows] + [200])
  height = head + sum(max(p.height for p in r) + pad for r in rows) + pad
  sheet = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(sheet)
  if title:
    draw.text((pad, 6), title, fill="black", font=_font(16))
  y = head + pad
  for r in rows:
    x = pad
    for p in r:
      sheet.paste(p, (x, y))
      x += p.width + pad
    y += max(p.height for p in r) + pad
  return save_png(sheet, path)
