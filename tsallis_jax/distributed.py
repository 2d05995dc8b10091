"""Multi-host start-up, the device mesh from a config, and per-host data sharding.

The same code runs on a laptop CPU, a multi-GPU host, a Cloud TPU pod slice and two fake hosts on 127.0.0.1:

1. `maybe_initialize()` calls `jax.distributed.initialize()` on multi-host runs only. It must run before anything
   touches a JAX backend (the first `jax.devices()`, the first array).
2. `make_mesh({"data": -1, "model": 1})` builds the mesh over the *global* devices, one axis per config entry.
3. Each host reads its own rows of the global batch: `host_batch_slice(global_batch_size, mesh, batch_axes)`;
   `global_batch_from_local(local_tree, mesh, pspec)` assembles the global `jax.Array`s from those rows.
4. Only `is_main_process()` writes logs and metrics; every process writes its own shards of a checkpoint.

How a run says it is multi-host (first match wins):

- explicit arguments to `maybe_initialize`, or the environment variables `TSALLIS_COORDINATOR` (host:port),
  `TSALLIS_NUM_PROCESSES` and `TSALLIS_PROCESS_ID` (multi-GPU hosts, the local two-process test);
- `TSALLIS_DISTRIBUTED=auto`, set by `launch/host.sh` on multi-host TPU slices: JAX detects the cluster itself;
- Cloud TPU pod variables: `MEGASCALE_COORDINATOR_ADDRESS` (multislice), or `TPU_WORKER_HOSTNAMES` /
  `TPU_PROCESS_ADDRESSES` naming more than one host.

Anything else is a single-process run and `jax.distributed` is left alone. See launch/TPU.md for the recipe.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tsallis_jax.mesh_axes import resolve_axis_sizes  # noqa: F401 (re-exported; pure, no JAX)

ENV_COORDINATOR = "TSALLIS_COORDINATOR"
ENV_NUM_PROCESSES = "TSALLIS_NUM_PROCESSES"
ENV_PROCESS_ID = "TSALLIS_PROCESS_ID"
ENV_DISTRIBUTED = "TSALLIS_DISTRIBUTED"


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
  """How this process joined (or did not join) a multi-host job.

  Attributes:
    initialized: whether `jax.distributed.initialize` was called by this or an earlier call.
    method: "single" (no multi-host run), "explicit" (arguments / TSALLIS_* variables), "auto" (JAX's cluster
      detection: TPU pods, Slurm, ...), or "already" (jax.distributed was initialised before this call).
    coordinator_address: host:port of process 0 for the explicit method, else None.
    num_processes: the process count requested, None when JAX detects it.
    process_id: this process's id requested, None when JAX detects it.
  """
  initialized: bool
  method: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def _env_int(name: str, environ: Mapping[str, str]) -> int | None:
  raw = environ.get(name)
  if raw is None or raw.strip() == "":
    return None
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"{name}={raw!r} is not an integer; set it to a whole number or unset it.") from None


def _host_count(raw: str | None) -> int:
  """Number of hosts in a comma-separated TPU host list (0 when unset)."""
  if not raw:
    return 0
  return len([h for h in raw.split(",") if h.strip()])


def detect_multihost(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> DistributedInfo:
  """Decides, without side effects, whether and how this process should join a multi-host job.

  Args:
    coordinator_address: host:port of process 0; overrides `TSALLIS_COORDINATOR`.
    num_processes: total processes; overrides `TSALLIS_NUM_PROCESSES`.
    process_id: this process's id in [0, num_processes); overrides `TSALLIS_PROCESS_ID`.
    environ: the environment to read (defaults to `os.environ`); a parameter so tests need not mutate it.

  Returns:
    A `DistributedInfo` with `initialized=False` describing what `maybe_initialize` would do.

  Raises:
    ValueError: when only some of the explicit settings are given, or they are inconsistent.
  """
  environ = os.environ if environ is None else environ
  coordinator_address = coordinator_address or environ.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES, environ)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID, environ)

  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
  given = [k for k, v in explicit.items() if v is not None]
  if given:
    if num_processes is not None and num_processes < 1:
      raise ValueError(f"num_processes={num_processes} must be >= 1 (set {ENV_NUM_PROCESSES} to the host count).")
    if num_processes == 1 and coordinator_address is None:
      # A one-process run that only names itself process 0 (or nothing): nothing to join.
      if process_id not in (None, 0):
        raise ValueError(f"process_id={process_id} with num_processes=1; the only valid id is 0.")
      return DistributedInfo(initialized=False, method="single", num_processes=1, process_id=0)
    missing = [k for k, v in explicit.items() if v is None]
    if missing:
      raise ValueError(
          f"A multi-host run needs coordinator_address, num_processes and process_id together; got {given} "
          f"but not {missing}. Set {ENV_COORDINATOR}=host:port, {ENV_NUM_PROCESSES}=N and {ENV_PROCESS_ID}=i "
          "on every host (process 0 listens at the coordinator address), or unset them for a single-host run.")
    if ":" not in coordinator_address:
      raise ValueError(f"coordinator_address={coordinator_address!r} needs a port, e.g. '10.0.0.2:8476'.")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} must lie in [0, {num_processes}) for num_processes={num_processes}.")
    if num_processes == 1:
      return DistributedInfo(initialized=False, method="single", coordinator_address=coordinator_address,
                             num_processes=1, process_id=0)
    return DistributedInfo(initialized=False, method="explicit", coordinator_address=coordinator_address,
                           num_processes=num_processes, process_id=process_id)

  flag = environ.get(ENV_DISTRIBUTED, "").strip().lower()
  if flag not in ("", "auto", "0", "off", "none"):
    raise ValueError(f"{ENV_DISTRIBUTED}={flag!r} is not understood; use 'auto' (multi-host TPU slice) or unset it.")
  if flag == "auto":
    return DistributedInfo(initialized=False, method="auto")
  if flag in ("0", "off", "none"):
    return DistributedInfo(initialized=False, method="single")
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return DistributedInfo(initialized=False, method="auto")
  hosts = max(_host_count(environ.get("TPU_WORKER_HOSTNAMES")), _host_count(environ.get("TPU_PROCESS_ADDRESSES")))
  if hosts > 1:
    return DistributedInfo(initialized=False, method="auto")
  return DistributedInfo(initialized=False, method="single")


def _cpu_only(environ: Mapping[str, str]) -> bool:
  platforms = environ.get("JAX_PLATFORMS") or (jax.config.jax_platforms or "")
  return platforms.strip().lower() == "cpu"


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
) -> DistributedInfo:
  """Calls `jax.distributed.initialize` on multi-host runs only; a no-op on a single host.

  Call it first thing in an entry point, before any JAX computation. Safe to call twice. On a CPU-only run
  (`JAX_PLATFORMS=cpu`, the local two-process test) it selects gloo CPU collectives first, without which
  cross-process computations on CPU fail.

  Args:
    coordinator_address: host:port of process 0 (else `TSALLIS_COORDINATOR`).
    num_processes: total number of processes (else `TSALLIS_NUM_PROCESSES`).
    process_id: this process's id (else `TSALLIS_PROCESS_ID`).
    initialization_timeout: seconds to wait for every process to reach the coordinator.

  Returns:
    The `DistributedInfo` of what was done.
  """
  if jax.distributed.is_initialized():
    return DistributedInfo(initialized=True, method="already")
  info = detect_multihost(coordinator_address, num_processes, process_id)
  if info.method == "single":
    return info
  if _cpu_only(os.environ):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if info.method == "explicit":
    jax.distributed.initialize(coordinator_address=info.coordinator_address, num_processes=info.num_processes,
                               process_id=info.process_id, initialization_timeout=initialization_timeout)
  else:
    jax.distributed.initialize(initialization_timeout=initialization_timeout)
  return dataclasses.replace(info, initialized=True)


def is_main_process() -> bool:
  """True on process 0, the only process that writes logs, metrics and plots."""
  return jax.process_index() == 0


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the mesh over the global devices with the config's axis sizes (one may be -1).

  The axes are `AxisType.Auto` (`jax.make_mesh` defaults to Explicit, under which an embedding gather on a
  batch-sharded input fails). `jax.make_mesh` orders devices along the physical TPU topology.

  Args:
    axis_sizes: mesh axis name -> size, in mesh order; see `resolve_axis_sizes`.
    devices: defaults to `jax.devices()`, every device of every process.

  Returns:
    A `Mesh` whose axis names are the keys of `axis_sizes`.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = resolve_axis_sizes(axis_sizes, len(devices))
  names = tuple(sizes)
  return jax.make_mesh(tuple(sizes.values()), names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def _batch_sharding(mesh: Mesh, batch_axes: str | Sequence[str] | None) -> tuple[NamedSharding, tuple[str, ...]]:
  if batch_axes is None:
    batch_axes = tuple(mesh.axis_names)
  elif isinstance(batch_axes, str):
    batch_axes = (batch_axes,)
  unknown = [a for a in batch_axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"batch axes {unknown} are not mesh axes {tuple(mesh.axis_names)}.")
  return NamedSharding(mesh, PartitionSpec(tuple(batch_axes))), tuple(batch_axes)


def host_batch_slice(
    global_batch_size: int,
    mesh: Mesh | None = None,
    batch_axes: str | Sequence[str] | None = None,
) -> slice:
  """The rows of the global batch that this process reads.

  With a mesh, the rows are exactly those that this process's devices hold when the batch dimension is sharded
  over `batch_axes` (hosts that are replicas along the other axes read the same rows). Without one, the batch is
  split evenly in process order.

  Args:
    global_batch_size: rows in the global batch (prompts, the legend's B).
    mesh: the training mesh; None for the even split.
    batch_axes: mesh axes that shard the batch dimension (default: all mesh axes).

  Returns:
    `slice(start, stop)` into the global batch.

  Raises:
    ValueError: a batch that does not divide evenly, or a sharding whose rows on this host are not contiguous.
  """
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size={global_batch_size} must be >= 1.")
  if mesh is None:
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
      raise ValueError(f"global batch of {global_batch_size} rows does not split over {count} processes; "
                       f"make it a multiple of {count}.")
    rows = global_batch_size // count
    return slice(index * rows, (index + 1) * rows)
  sharding, axes = _batch_sharding(mesh, batch_axes)
  shards = math.prod(mesh.shape[a] for a in axes)
  if global_batch_size % shards:
    raise ValueError(f"global batch of {global_batch_size} rows does not split over the {shards} batch shards of "
                     f"mesh {dict(mesh.shape)}; make it a multiple of {shards}.")
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  starts_stops = sorted({(idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop)
                         for idx in index_map.values()})
  start, stop = starts_stops[0][0], starts_stops[-1][1]
  covered = sum(b - a for a, b in starts_stops)
  if covered != stop - start:
    raise ValueError(f"this process's rows {starts_stops} are not contiguous under mesh {dict(mesh.shape)}; "
                     "put the batch axes first in the mesh (e.g. {'data': -1, 'model': k}).")
  return slice(start, stop)


def process_local_rows(global_batch_size: int, mesh: Mesh | None = None,
                       batch_axes: str | Sequence[str] | None = None) -> int:
  """How many rows of the global batch this process reads (see `host_batch_slice`)."""
  rows = host_batch_slice(global_batch_size, mesh, batch_axes)
  return rows.stop - rows.start


def global_batch_from_local(local_tree: Any, mesh: Mesh, pspec: PartitionSpec | Any,
                            global_batch_size: int | None = None) -> Any:
  """Assembles global `jax.Array`s from each process's rows (`jax.make_array_from_process_local_data`).

  Args:
    local_tree: a pytree of numpy arrays, this process's rows (`host_batch_slice`) on the leading dimension.
    mesh: the training mesh.
    pspec: a `PartitionSpec` for every leaf, or a pytree prefix of specs; its first entry names the batch axes.
    global_batch_size: rows of the global batch; inferred from the sharding when None.

  Returns:
    The same pytree of global arrays, sharded by `NamedSharding(mesh, pspec)`.
  """
  is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
  sharding = jax.tree.map(lambda spec: NamedSharding(mesh, spec), pspec, is_leaf=is_spec)
  if global_batch_size is None:
    return jax.make_array_from_process_local_data(sharding, local_tree)
  global_shape = jax.tree.map(lambda x: (global_batch_size,) + tuple(np.shape(x)[1:]), local_tree)
  return jax.make_array_from_process_local_data(sharding, local_tree, global_shape)
