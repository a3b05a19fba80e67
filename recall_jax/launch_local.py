"""N processes of the main job on this machine, as on N hosts: CPU devices, a local `jax.distributed` coordinator.

    python -m recall_jax.launch_local -n 2 --devices 4 -- --config configs/tiny.py --workdir runs/tiny_2proc

Each process gets RECALL_COORDINATOR=127.0.0.1:<free port>, RECALL_NUM_PROCESSES and RECALL_PROCESS_ID (read by
`parallel.maybe_initialize_distributed`) and `--devices` CPU devices, so the run spans N x devices devices, one mesh
over all of them. Process 0 writes and logs; the others print warnings only. The first process to fail stops the
others, and its exit status is the launcher's.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, *, coordinator: str, num_processes: int, process_id: int, devices: int) -> dict:
  """The environment of one process: the coordinator, its id, and `devices` CPU devices (other XLA flags kept)."""
  flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  return {**base, "RECALL_COORDINATOR": coordinator, "RECALL_NUM_PROCESSES": str(num_processes),
          "RECALL_PROCESS_ID": str(process_id), "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])}


def launch(args: Sequence[str], *, num_processes: int, devices: int, module: str = "recall_jax.main",
           timeout: Optional[float] = None, env: Optional[dict] = None) -> int:
  """Runs `python -m module *args` as `num_processes` processes; returns 0, or the first failure's exit status
  (the others are then stopped). `timeout` (seconds) stops them all and returns 124."""
  if num_processes < 1 or devices < 1:
    raise ValueError(f"launch_local: -n ({num_processes}) and --devices ({devices}) must be >= 1")
  coordinator = f"127.0.0.1:{free_port()}"
  base = dict(os.environ if env is None else env)
  procs = [subprocess.Popen([sys.executable, "-m", module, *args],
                            env=process_env(base, coordinator=coordinator, num_processes=num_processes,
                                            process_id=i, devices=devices))
           for i in range(num_processes)]
  deadline = None if timeout is None else time.monotonic() + timeout
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        return failed[0]
      if all(c == 0 for c in codes):
        return 0
      if deadline is not None and time.monotonic() > deadline:
        return 124
      time.sleep(0.2)
  finally:
    for p in procs:  # only the processes started here, by their own handles
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   usage="python -m recall_jax.launch_local -n N [--devices D] -- <main args>")
  parser.add_argument("-n", "--num_processes", type=int, default=2, help="processes (default 2)")
  parser.add_argument("--devices", type=int, default=4, help="CPU devices per process (default 4)")
  parser.add_argument("--module", default="recall_jax.main", help="the module each process runs")
  parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the arguments of the module")
  ns = parser.parse_args(argv)
  args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
  return launch(args, num_processes=ns.num_processes, devices=ns.devices, module=ns.module)


if __name__ == "__main__":
  sys.exit(main())
