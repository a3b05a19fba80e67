"""Test-wide setup: 8 fake CPU devices (for sharding tests) and exact fp32 matmuls (for parity with PyTorch)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
