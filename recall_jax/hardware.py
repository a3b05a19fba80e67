"""The peak matmul rate model-FLOPs utilisation (MFU) is measured against.

Accelerators: the chip's dense bf16 peak from its data sheet, by `device_kind` (the convention MFU figures use; an
fp32 run is then far below 1). CPU: there is no data sheet for a shared host, so the peak is measured at start, as
the best of a few jitted fp32 matmuls of 2048 x 2048 on this process's devices (what XLA really reaches here).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp

# Dense bf16 FLOP/s per chip, data-sheet figures (no sparsity).
CHIP_PEAKS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12),
)
MATMUL = 2048


@dataclasses.dataclass(frozen=True)
class Peak:
  flops_per_s: float  # per device
  devices: int
  source: str  # "data sheet: <kind>" or "measured: fp32 matmul"

  @property
  def total(self) -> float:
    return self.flops_per_s * self.devices


def _measured_cpu_peak(reps: int = 5) -> float:
  x = jnp.ones((MATMUL, MATMUL), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * MATMUL**3 / best


@functools.lru_cache(maxsize=None)
def peak(devices: Optional[int] = None) -> Optional[Peak]:
  """The peak of `devices` (default: all) devices of this process's platform; None for an accelerator whose kind is
  not in CHIP_PEAKS (the caller says so: MFU is then not reported)."""
  dev = jax.devices()[0]
  n = devices or jax.device_count()
  if dev.platform == "cpu":
    # One matmul already spreads over every core, and the host devices share those cores: the host's peak is one
    # measurement, divided among its devices.
    return Peak(_measured_cpu_peak() / jax.local_device_count(), n, "measured: fp32 matmul")
  kind = dev.device_kind
  for name, flops in CHIP_PEAKS:
    if name.lower() in kind.lower():
      return Peak(flops, n, f"data sheet: {kind} bf16")
  return None
