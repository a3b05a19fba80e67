"""Placement, and the processes of a multi-host run: the one owner of both.

The mesh has named axes (data, fsdp, tensor); `mesh_from_config` builds it from config `mesh.shape` and the main job
builds it once for every stage. Batches are sharded over (data, fsdp) and reach the devices by one path,
`host_to_global` (each process passes its slice, or the whole batch); parameters follow regex rules from the config
(first match wins, big_vision style), so sharding is configuration, not code; `to_host` / `local_rows` bring results
back. Of several processes, process 0 writes (`is_writer`) and all meet at `barrier`.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> None:
  """Calls jax.distributed.initialize when launched as one of several processes.

  Cluster launchers (SLURM, TPU pods) are auto-detected by JAX; an explicit coordinator can be given through
  RECALL_COORDINATOR / RECALL_NUM_PROCESSES / RECALL_PROCESS_ID.
  """
  if os.environ.get("RECALL_COORDINATOR"):
    # CPU processes (the local launcher) need cross-process collectives; gloo is jax 0.10's default, set anyway.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
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


def mesh_from_config(cfg) -> Mesh:
  """The run's mesh over every device of every process: config `mesh.shape` (data, fsdp, tensor)."""
  return make_mesh(tuple(cfg.mesh.shape))


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch is split: the product of the mesh's batch axes."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


def batch_sharding(mesh: Mesh, ndim: int = 1, axis: int = 0) -> NamedSharding:
  """Dimension `axis` (the batch) over every batch axis present in the mesh, the rest replicated."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  spec = [None] * ndim
  spec[axis] = axes
  return NamedSharding(mesh, P(*spec))


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


def tree_shardings(tree, mesh: Mesh, rules: Sequence[tuple[str, Sequence[str | None]]] = ()) -> Any:
  """A tree of NamedShardings for the arrays of `tree` (concrete or abstract) by `param_shardings`, with parameter
  paths as "language_model/layers/0/self_attn/q_proj/kernel" (an nnx Variable's "/value" dropped)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [jax.tree_util.keystr(tuple(p), simple=True, separator="/").removesuffix("/value") for p, _ in leaves]
  shardings = param_shardings({p: np.shape(x) for p, (_, x) in zip(paths, leaves)}, mesh, rules)
  return jax.tree_util.tree_unflatten(treedef, [shardings[p] for p in paths])


def place_params(tree, mesh: Mesh, rules: Sequence[tuple[str, Sequence[str | None]]] = ()) -> Any:
  """Puts every array of `tree` on `mesh` with the PartitionSpec of the first matching regex rule
  (`tree_shardings`); unmatched arrays are replicated. Arrays already placed that way (e.g. loaded straight onto
  their sharding) are not copied; PRNG keys travel as their key data."""
  return jax.tree.map(_put, tree, tree_shardings(tree, mesh, rules))


def replicate(tree, mesh: Mesh) -> Any:
  """Every array of `tree` replicated over `mesh` (the same value on every process)."""
  return jax.tree.map(lambda x: _put(x, NamedSharding(mesh, P())), tree)


def _put(x, sharding: NamedSharding):
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
  if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return jax.device_put(x, sharding)  # one process, or global already: device to device
  # Host values are the same on every process; each process copies only its devices' slices.
  host = np.asarray(jax.device_get(x))
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def host_to_global(batch, mesh: Mesh, *, batch_axes: Mapping[str, int] | None = None,
                   global_rows: int | None = None, replicate: Sequence[str] = ("vision",)) -> Any:
  """Host arrays -> global arrays sharded over the mesh's batch axes: the one path by which batches reach devices.

  batch: a pytree of numpy arrays; each leaf's batch dimension is 0, or `batch_axes[key]` for a dict key (e.g.
  position ids (3, B, L): 1). A leaf under a key of `replicate` (default "vision", the vision geometry) is
  replicated.
  global_rows: None when each process holds its own slice of the batch (the Grain pipelines), the global batch size
  when every process holds the whole batch (jax then copies each device's rows).
  """
  batch_axes = dict(batch_axes or {})

  def put(path, x):
    keys = [getattr(k, "key", None) for k in path]
    if any(k in keys for k in replicate):
      return _put(np.asarray(x), NamedSharding(mesh, P()))
    x = np.asarray(x)
    axis = next((batch_axes[k] for k in reversed(keys) if k in batch_axes), 0)
    rows = x.shape[axis] * (1 if global_rows is not None else jax.process_count())
    if rows % batch_shards(mesh):
      raise ValueError(f"a batch of {rows} rows ({jax.tree_util.keystr(path)}) does not divide into the "
                       f"{batch_shards(mesh)} batch shards of mesh {dict(mesh.shape)}: make the batch size a "
                       f"multiple of them")
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, axis), x,
                                                  x.shape if global_rows is not None else None)

  return jax.tree_util.tree_map_with_path(put, batch)


def to_host(tree) -> Any:
  """Every jax array of `tree` as numpy holding the whole global array, on every process (gathered across
  processes where needed)."""
  def get(x):
    if not isinstance(x, jax.Array):
      return x
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(get, tree)


def addressable(tree) -> Any:
  """`tree` with every array that spans other processes gathered to numpy here; the rest as it is."""
  return jax.tree.map(lambda x: to_host(x) if isinstance(x, jax.Array) and not x.is_fully_addressable else x, tree)


def constrain_batch(tree, mesh: Mesh) -> Any:
  """Inside jit: every array's leading (batch) dimension over the batch axes; scalars replicated."""
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, batch_sharding(mesh, x.ndim) if x.ndim else NamedSharding(mesh, P())), tree)


def local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
  """This process's rows of a batch-sharded global array: the slice it passed to `host_to_global`."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  spec = batch_sharding(mesh, x.ndim).spec
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))


def gather_rows(rows: np.ndarray, filled: np.ndarray) -> np.ndarray:
  """Per-process results (N, ...) of which each process filled the rows `filled` (N,) -> all N rows on every
  process, each from the process that filled it (copied, not summed, so the values are bit-exact)."""
  if jax.process_count() == 1:
    return rows
  every, owners = multihost_utils.process_allgather((rows, filled))
  missing = np.flatnonzero(~owners.any(axis=0))
  if missing.size:
    raise ValueError(f"gather_rows: rows {missing[:5].tolist()} were filled by no process")
  return every[np.argmax(owners, axis=0), np.arange(len(rows))]


# ------------------------------------------------------------------------------------------------- processes


def is_writer() -> bool:
  """Whether this process writes artifacts, manifests and logs: process 0 of a multi-process run."""
  return jax.process_index() == 0


_barriers = itertools.count()


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a no-op with one process): before a stage is marked done,
  and before anyone reads what another process wrote.

  A barrier of the coordination service, not a device collective (`multihost_utils.sync_global_devices`): gloo
  gives a collective's peers 30 s to arrive, and the other processes wait here for as long as process 0 works
  alone (e.g. the prepare stage). RECALL_BARRIER_TIMEOUT_S (default 2 h) bounds the wait."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the coordination client of jax.distributed.initialize
  timeout_s = float(os.environ.get("RECALL_BARRIER_TIMEOUT_S", 7200))
  # Every process passes the same barriers in the same order, so the count makes each id unique and shared.
  distributed.global_state.client.wait_at_barrier(f"recall_jax/{next(_barriers)}/{name}", int(timeout_s * 1000))


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
