"""Interleaved timing of two implementations in one run: the measuring method the benchmarks share.

Single-shot timings swing 2x on shared machines, and a slow spell hits whichever side runs during it. Here the two
sides alternate (ours, reference, ours, ...; the first of each pair alternates too) after a warm-up that includes
compilation, and the figure is the median of the per-pair ratios reference / ours with its spread: a slow spell
that lasts a pair moves one ratio, not the median.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import numpy as np


def interleaved(ours: Callable[[], object], reference: Callable[[], object], *, repeats: int = 15,
                warmup: int = 2) -> dict:
  """Times `ours` and `reference` (each must block until its work is done) in alternating pairs.

  Returns seconds per call of each side (median, p25, p75) and the ratio reference / ours per pair: its median,
  p25 / p75 and min / max. > 1 means ours is faster."""
  for _ in range(warmup):
    ours()
    reference()
  t_ours, t_ref = [], []
  for k in range(repeats):
    order = ((ours, t_ours), (reference, t_ref)) if k % 2 == 0 else ((reference, t_ref), (ours, t_ours))
    for fn, times in order:
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
  ratios = np.asarray(t_ref) / np.asarray(t_ours)
  q = lambda x, p: float(np.percentile(x, p))
  side = lambda x: {"median": statistics.median(x), "p25": q(x, 25), "p75": q(x, 75)}
  return {"repeats": repeats, "seconds": {"recall_jax": side(t_ours), "reference": side(t_ref)},
          "ratio": {"median": float(np.median(ratios)), "p25": q(ratios, 25), "p75": q(ratios, 75),
                    "min": float(ratios.min()), "max": float(ratios.max())}}


def machine() -> dict:
  """What the figure was measured on and with."""
  import jax
  import torch
  import transformers
  out = {"platform": jax.devices()[0].platform, "device": str(jax.devices()[0]), "cpu": platform.processor() or
         platform.machine(), "jax": jax.__version__, "torch": torch.__version__,
         "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
         "date": time.strftime("%Y-%m-%d")}
  try:
    import peft
    out["peft"] = peft.__version__
  except ImportError:
    pass
  return out
