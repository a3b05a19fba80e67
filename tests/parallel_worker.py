"""One process of tests/test_parallel_processes.py (launched by recall_jax.launch_local): the placement and process
helpers of recall_jax.parallel across real processes. Exits non-zero on the first mismatch."""

import os
import sys

import jax
import numpy as np

from recall_jax import files, main, parallel

GLOBAL_ROWS = 8


def check(ok: bool, what: str) -> None:
  if not ok:
    print(f"process {jax.process_index()}: {what}", file=sys.stderr)
    sys.exit(1)


def run(out_dir: str) -> None:
  parallel.maybe_initialize_distributed()
  p, n = jax.process_index(), jax.process_count()
  mesh = parallel.make_mesh((-1, 1, 1))
  full = np.arange(GLOBAL_ROWS * 3, dtype=np.float32).reshape(GLOBAL_ROWS, 3)
  local = GLOBAL_ROWS // n
  mine = full[p * local:(p + 1) * local]
  # Position ids lead with the streams: their batch dimension is 1.
  positions = np.broadcast_to(np.arange(GLOBAL_ROWS)[None, :, None], (3, GLOBAL_ROWS, 2)).astype(np.int32)
  batch = parallel.host_to_global({"x": mine, "position_ids": positions[:, p * local:(p + 1) * local]}, mesh,
                                  batch_axes={"position_ids": 1})
  check(batch["x"].shape == (GLOBAL_ROWS, 3) and batch["position_ids"].shape == (3, GLOBAL_ROWS, 2),
        f"global shapes {batch['x'].shape}, {batch['position_ids'].shape}")
  doubled = jax.jit(lambda b: b["x"] * 2 + b["position_ids"][0, :, :1])(batch)
  expected = full * 2 + np.arange(GLOBAL_ROWS)[:, None]
  check(np.array_equal(parallel.to_host(doubled), expected), "to_host is not the whole global result")
  check(np.array_equal(parallel.local_rows(doubled, mesh), expected[p * local:(p + 1) * local]),
        "local_rows are not this process's rows")
  # Every process passing the whole batch (the sampler's way) gives the same global array.
  whole = parallel.host_to_global({"x": full}, mesh, global_rows=GLOBAL_ROWS)["x"]
  check(np.array_equal(parallel.to_host(jax.jit(lambda x: x * 2)(whole)), full * 2), "a whole-batch host_to_global")
  filled = np.zeros(GLOBAL_ROWS, bool)
  filled[p * local:(p + 1) * local] = True
  rows = np.where(filled[:, None], full, -1.0)
  check(np.array_equal(parallel.gather_rows(rows, filled), full), "gather_rows did not take each row from its owner")
  key = parallel.replicate({"rng": jax.random.key(3)}, mesh)["rng"]
  check(np.array_equal(jax.random.key_data(jax.random.key(3)), parallel.to_host(jax.random.key_data(key))),
        "a replicated key changed")
  # Process 0 writes; everyone reads after the barrier.
  path = os.path.join(out_dir, "shared.txt")
  files.atomic_write_text(path, f"written by {p}\n")
  parallel.barrier("written")
  with open(path) as f:
    check(f.read() == "written by 0\n", "the shared file is not process 0's")
  check(parallel.is_writer() == (p == 0), "is_writer")
  main.setup_logging()
  parallel.barrier("done")


if __name__ == "__main__":
  run(sys.argv[1])
