"""Test-wide setup: CPU only, 8 fake CPU devices (for sharding tests) and exact fp32 matmuls (for parity with
PyTorch)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite is a CPU suite; with libtpu installed (for the AOT plan's test) JAX would first probe for a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache per test session, made by the first process that loads this file (the xdist
# controller, before it starts the workers, which inherit it): the suite compiles the same tiny programs in many
# tests and in the stage subprocesses of test_kill_faults (alone: 500 s -> 270 s). Executables are keyed by their
# program, flags and devices, so a hit runs what a compilation would have produced.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="recall_jax_test_jit_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fashioniq_train(tmp_path_factory):
  """(training queries, image name -> path) of a tiny synthetic world in the FashionIQ layout: 6 triplets per
  category, 56 px images."""
  from recall_jax.data.readers import read_fashioniq
  from recall_jax.data.synthetic import generate_world
  root = tmp_path_factory.mktemp("fashioniq_world")
  generate_world(root, scale={"fashioniq": {"train": 6, "val": 1, "test": 1}}, layouts=("fashioniq",),
                 image_size=56, seed=0)
  splits = read_fashioniq(root / "fashioniq", "train")
  return [q for s in splits for q in s.queries], {k: v for s in splits for k, v in s.images.items()}
