"""Procedural rendering of a garment (PIL + numpy), deterministic given the garment and its jitter.

Shapes are drawn at twice the output size and box-filtered down, so edges are anti-aliased and attributes stay
readable at 112 px: dresses flare below the waist, shirts are straight with a button placket, tops are shorter with
rounded shoulders; sleeves, hem length and neckline change the silhouette; the pattern fills body and sleeves and
covers at most about a third of the area, so the named colour dominates.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw

from recall_jax.data.synthetic.attributes import COLOURS, Garment

_SUPERSAMPLE = 2
# Hem height (fraction of the canvas) per category and length.
_HEM = {
    "dress": {"short": 0.56, "knee": 0.72, "long": 0.90},
    "shirt": {"short": 0.50, "knee": 0.64, "long": 0.78},
    "toptee": {"short": 0.46, "knee": 0.60, "long": 0.74},
}
_SHOULDER_Y = 0.22


@dataclasses.dataclass(frozen=True)
class Jitter:
  """Nuisance variation: never named by any text, so no two images are pixel-identical."""

  dx: float  # garment offset, fraction of the canvas
  dy: float
  scale: float  # garment size multiplier
  brightness: float  # multiplier on the garment colours
  hue: tuple[int, int, int]  # per-channel colour offset
  background: tuple[int, int, int]  # background tint
  phase: tuple[float, float]  # pattern offset, fraction of the pattern period

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "Jitter":
    return cls(dx=data["dx"], dy=data["dy"], scale=data["scale"], brightness=data["brightness"],
               hue=tuple(data["hue"]), background=tuple(data["background"]), phase=tuple(data["phase"]))


def sample_jitter(rng: np.random.Generator) -> Jitter:
  r = lambda lo, hi: round(float(rng.uniform(lo, hi)), 4)  # rounded so the JSON scene graph is exact
  return Jitter(
      dx=r(-0.05, 0.05), dy=r(-0.04, 0.04), scale=r(0.9, 1.06), brightness=r(0.9, 1.08),
      hue=tuple(int(v) for v in rng.integers(-10, 11, size=3)),
      background=tuple(int(v) for v in rng.integers(185, 236, size=3)),
      phase=(r(0.0, 1.0), r(0.0, 1.0)))


def _shade(rgb: np.ndarray) -> np.ndarray:
  """A contrasting shade of the same hue for pattern, collar and buttons."""
  luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
  return rgb * 0.45 if luminance > 140 else rgb + (255.0 - rgb) * 0.55


def _pattern(pattern: str, base: np.ndarray, second: np.ndarray, size: int, phase: tuple[float, float]) -> np.ndarray:
  """The fabric: one period tile of the pattern, repeated over the canvas and shifted by `phase`."""
  period = max(4, round(size / 9))
  t = (np.arange(period, dtype=np.float32) + 0.5) / period
  u, v = t[None, :], t[:, None]
  if pattern == "solid":
    mark = np.zeros((period, period), dtype=bool)
  elif pattern == "stripes":
    mark = v < 0.38
  elif pattern == "checks":
    mark = (u < 0.2) | (v < 0.2)
  elif pattern == "dots":
    mark = (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.24 ** 2
  elif pattern == "zigzag":
    mark = np.abs(v - (0.25 + 0.5 * np.abs(2.0 * u - 1.0))) < 0.13
  else:
    raise ValueError(f"unknown pattern {pattern!r}")
  tile = np.where(np.broadcast_to(mark, (period, period))[..., None], second.astype(np.uint8), base.astype(np.uint8))
  reps = size // period + 2
  ox, oy = int(phase[0] * period), int(phase[1] * period)
  return np.ascontiguousarray(np.tile(tile, (reps, reps, 1))[oy:oy + size, ox:ox + size])


def _dilate(m: np.ndarray, radius: int) -> np.ndarray:
  out = m.copy()
  for _ in range(radius):
    grown = out.copy()
    np.maximum(grown[1:], out[:-1], out=grown[1:])
    np.maximum(grown[:-1], out[1:], out=grown[:-1])
    np.maximum(grown[:, 1:], out[:, :-1], out=grown[:, 1:])
    np.maximum(grown[:, :-1], out[:, 1:], out=grown[:, :-1])
    out = grown
  return out


def _silhouette(g: Garment, cx: float, top: float, s: float) -> tuple[list, list[list]]:
  """Body polygon and sleeve polygons in canvas-fraction coordinates."""
  hem = top + (_HEM[g.category][g.length] - _SHOULDER_Y) * s
  half = 0.17 * s
  if g.category == "dress":
    waist = top + 0.2 * s
    flare = half * 0.8 + (hem - waist) * 0.45
    body = [(cx - half * 0.9, top), (cx + half * 0.9, top), (cx + half * 0.75, waist), (cx + flare, hem),
            (cx - flare, hem), (cx - half * 0.75, waist)]
  elif g.category == "shirt":
    body = [(cx - half, top), (cx + half, top), (cx + half, hem), (cx - half, hem)]
  else:
    body = [(cx - half * 0.8, top), (cx - half * 0.55, top - 0.02 * s), (cx + half * 0.55, top - 0.02 * s),
            (cx + half * 0.8, top), (cx + half * 0.95, top + 0.08 * s), (cx + half * 0.9, hem),
            (cx - half * 0.9, hem), (cx - half * 0.95, top + 0.08 * s)]
  sleeves = []
  if g.sleeves != "none":
    reach = (0.11 if g.sleeves == "short" else 0.27) * s
    drop = (0.10 if g.sleeves == "short" else 0.36) * s
    width = 0.075 * s
    for side in (-1, 1):
      x0 = cx + side * half * 0.88
      sleeves.append([(x0, top), (x0 + side * reach, top + drop), (x0 + side * (reach - width * 0.6),
                      top + drop + width), (x0, top + 0.13 * s)])
  return body, sleeves


def render(g: Garment, jitter: Jitter, size: int = 112) -> Image.Image:
  """The garment as an RGB image of `size` x `size` pixels."""
  n = size * _SUPERSAMPLE
  px = lambda pts: [(x * n, y * n) for x, y in pts]
  s = jitter.scale
  cx, top = 0.5 + jitter.dx, _SHOULDER_Y + jitter.dy - (s - 1.0) * 0.15
  base = np.clip(np.asarray(COLOURS[g.colour], np.float32) * jitter.brightness + np.asarray(jitter.hue), 0, 255)
  second = np.clip(_shade(base), 0, 255)

  mask = Image.new("L", (n, n), 0)
  draw = ImageDraw.Draw(mask)
  body, sleeves = _silhouette(g, cx, top, s)
  draw.polygon(px(body), fill=255)
  for sleeve in sleeves:
    draw.polygon(px(sleeve), fill=255)
  neck_w, neck_d = 0.065 * s, (0.11 if g.neckline == "v" else 0.05) * s
  if g.neckline == "v":
    draw.polygon(px([(cx - neck_w, top - 0.03), (cx + neck_w, top - 0.03), (cx, top + neck_d)]), fill=0)
  else:
    draw.ellipse(px([(cx - neck_w, top - neck_d), (cx + neck_w, top + neck_d)]), fill=0)

  fill = Image.fromarray(_pattern(g.pattern, base, second, n, jitter.phase))
  img = Image.composite(fill, Image.new("RGB", (n, n), jitter.background), mask)
  # A dark outline (light for dark garments) keeps white garments visible on pale backgrounds.
  edge = Image.fromarray(_dilate(np.asarray(mask), 2) - np.asarray(mask))
  outline = (200, 200, 200) if g.colour == "black" else (35, 35, 35)
  img = Image.composite(Image.new("RGB", (n, n), outline), img, edge)

  draw = ImageDraw.Draw(img)
  trim = tuple(int(v) for v in second)
  if g.neckline == "collar":
    for side in (-1, 1):
      flap = [(cx + side * 0.01 * s, top + neck_d), (cx + side * (neck_w + 0.05 * s), top - 0.01),
              (cx + side * (neck_w + 0.01 * s), top + neck_d + 0.06 * s)]
      draw.polygon(px(flap), fill=trim, outline=outline, width=2)
  if g.category == "shirt":
    hem = top + (_HEM["shirt"][g.length] - _SHOULDER_Y) * s
    for y in np.arange(top + neck_d + 0.07 * s, hem - 0.02, 0.07 * s):
      r = 0.013 * s
      draw.ellipse(px([(cx - r, y - r), (cx + r, y + r)]), fill=trim, outline=outline)
  return img.resize((size, size), Image.BOX)


def to_bytes(img: Image.Image, fmt: str) -> bytes:
  """Encoded image bytes; PNG and JPEG encoders here add no timestamps, so output is reproducible."""
  buf = io.BytesIO()
  if fmt == "png":
    img.save(buf, format="PNG", compress_level=1)
  elif fmt == "jpg":
    img.save(buf, format="JPEG", quality=92)
  else:
    raise ValueError(f"unknown image format {fmt!r}; expected 'png' or 'jpg'")
  return buf.getvalue()
