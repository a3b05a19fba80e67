"""The MFU peak: measured on CPU, looked up by device kind on accelerators."""

from unittest import mock

import jax

from recall_jax import hardware


def test_cpu_peak_is_measured_and_shared_by_the_host_devices():
  p = hardware.peak(2)
  assert p.source.startswith("measured") and p.devices == 2
  # A CPU core does at least ~1 GFLOP/s of fp32 matmul and no host reaches 100 TFLOP/s.
  assert 1e9 / jax.local_device_count() < p.flops_per_s < 1e14
  assert p.total == 2 * p.flops_per_s


def test_accelerator_peaks_come_from_the_data_sheet_and_unknown_kinds_say_none():
  hardware.peak.cache_clear()
  try:
    for kind, want in (("NVIDIA H100 80GB HBM3", 989e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12)):
      dev = mock.Mock(platform="gpu", device_kind=kind)
      with mock.patch.object(jax, "devices", return_value=[dev]):
        p = hardware.peak(8)
        hardware.peak.cache_clear()
      assert (p.flops_per_s, p.devices) == (want, 8) and kind in p.source
    with mock.patch.object(jax, "devices", return_value=[mock.Mock(platform="gpu", device_kind="Mystery X1")]):
      assert hardware.peak(1) is None
  finally:
    hardware.peak.cache_clear()
