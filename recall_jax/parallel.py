"""Device mesh, regex sharding rules and multi-host initialisation.

The mesh has named axes (data, fsdp, tensor). Batches are sharded over (data, fsdp); parameters follow regex rules
from the config (first match wins), big_vision style, so sharding is configuration, not code.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> None:
  """Calls jax.distributed.initialize when launched as one of several processes.

  Cluster launchers (SLURM, TPU pods) are auto-detected by JAX; an explicit coordinator can be given through
  RECALL_COORDINATOR / RECALL_NUM_PROCESSES / RECALL_PROCESS_ID.
  """
  if os.environ.get("RECALL_COORDINATOR"):
    jax.distributed.initialize(
        coordinator_address=os.environ["RECALL_COORDINATOR"],
        num_processes=int(os.environ["RECALL_NUM_PROCESSES"]),
        process_id=int(os.environ["RECALL_PROCESS_ID"]))
  elif any(k in os.environ for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")):
    if int(os.environ.get("SLURM_NTASKS", "2")) > 1:
      jax.distributed.initialize()


def make_mesh(shape: Sequence[int], axes: Sequence[str] = MESH_AXES,
              devices: Iterable[jax.Device] | None = None) -> Mesh:
  """Builds a mesh; one entry of `shape` may be -1 (all remaining devices). Auto axis types, so jit propagates."""
  devices = np.asarray(list(devices) if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(axes):
    raise ValueError(f"mesh.shape {tuple(shape)} must have one entry per axis {tuple(axes)}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape {tuple(shape)}: at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if devices.size % known:
      raise ValueError(f"mesh.shape {tuple(shape)} does not divide {devices.size} devices")
    shape[shape.index(-1)] = devices.size // known
  if int(np.prod(shape)) != devices.size:
    raise ValueError(f"mesh.shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {devices.size}")
  return Mesh(devices.reshape(shape), tuple(axes))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension over every batch axis present in the mesh, the rest replicated."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def rules_from_config(cfg) -> list[tuple[str, tuple]]:
  """Config `sharding.rules`: [(regex over parameter paths, PartitionSpec entries), ...]; none -> replicated."""
  rules = cfg.sharding.rules if "sharding" in cfg else ()
  return [(pattern, tuple(spec)) for pattern, spec in rules]


def spec_for(path: str, rules: Sequence[tuple[str, Sequence[str | None]]], ndim: int) -> P:
  """PartitionSpec of the first rule whose regex matches `path` (re.search); replicated when none matches.

  A rule's spec is cut or padded to the array rank so one rule can cover kernels and biases alike.
  """
  for pattern, spec in rules:
    if re.search(pattern, path):
      spec = tuple(spec)[:ndim]
      return P(*spec, *([None] * (ndim - len(spec))))
  return P()


def param_shardings(paths_and_shapes: dict[str, tuple[int, ...]], mesh: Mesh,
                    rules: Sequence[tuple[str, Sequence[str | None]]]) -> dict[str, NamedSharding]:
  """NamedSharding per parameter path; an axis that does not divide its dimension is dropped (replicated)."""
  out = {}
  for path, shape in paths_and_shapes.items():
    spec = spec_for(path, rules, len(shape))
    fixed = []
    for dim, axis in zip(shape, spec):
      size = 1 if axis is None else int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))]))
      fixed.append(axis if dim % size == 0 else None)
    out[path] = NamedSharding(mesh, P(*fixed))
  return out


def tree_shardings(tree, mesh: Mesh, rules: Sequence[tuple[str, Sequence[str | None]]]):
  """A tree of NamedShardings for the arrays of `tree` (concrete or abstract) by `param_shardings`, with parameter
  paths as "language_model/layers/0/self_attn/q_proj/kernel" (an nnx Variable's "/value" dropped)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [jax.tree_util.keystr(tuple(p), simple=True, separator="/").removesuffix("/value") for p, _ in leaves]
  shardings = param_shardings({p: np.shape(x) for p, (_, x) in zip(paths, leaves)}, mesh, rules)
  return jax.tree_util.tree_unflatten(treedef, [shardings[p] for p in paths])


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's slice of a global batch into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}


def settle(tree):
  """Waits for `tree` when it lives on several CPU devices; elsewhere returns at once. Returns `tree`.

  XLA:CPU runs every device of a multi-device program on one shared thread pool, and each device blocks a pool
  thread at every collective until its peers arrive. With several such executions queued (async dispatch), the
  peers' work can sit behind the blocked threads: a deadlock that XLA aborts after 40 s ("Termination timeout for
  all gather RendezvousKey..."). Seen on jax 0.10.2 with 8 host devices on 2 cores, in the suite and in a bare
  repro; `jax_cpu_enable_async_dispatch=False` does not cover multi-device programs. GPU and TPU order their
  collectives per stream, so there this is a no-op and the step loop keeps its asynchronous dispatch.
  """
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      devices = leaf.sharding.device_set
      if len(devices) > 1 and next(iter(devices)).platform == "cpu":
        jax.block_until_ready(tree)
      break
  return tree
