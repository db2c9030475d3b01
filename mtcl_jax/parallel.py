"""Device mesh, shardings, batch placement and multi-host start-up.

Everything data-parallel in mtcl_jax goes through one 1-D mesh whose only axis, ``"data"``, spans every device of
every process: the batch is sharded on it, the train state is replicated. There is no ``jax.pmap`` (in maintenance
since JAX 0.8): ``jax.jit`` over this mesh partitions the step, and ``jax.shard_map`` is used where a loss needs
explicit collectives.

The mesh axis is ``AxisType.Auto`` — the flax-examples / big_vision style: shardings are given on the jitted step's
inputs and outputs, ``jax.lax.with_sharding_constraint`` pins an intermediate where it matters, and the compiler
propagates the rest. Explicit axes ("sharding in types") would make every op's output sharding part of its type,
and the rules that infer it change between JAX releases: a step that traced on jax 0.10 fails on 0.11 and 0.12
(the transpose of a gather on a batch-sharded array has no inferable sharding). Auto axes behave the same on every
release we support.

Multi-host runs use JAX's own runtime: call :func:`initialize_distributed` first thing in each process (it reads
flags or the usual ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables, and
auto-detects SLURM and Cloud TPU), then every process feeds its own rows of the global batch through
:func:`shard_batch`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
  """Starts JAX's multi-process runtime when a multi-process run is asked for; returns whether it did.

  Arguments left as ``None`` fall back to ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
  With none of them set and no cluster environment (SLURM, Open MPI, Cloud TPU) this is a no-op, so single-process
  runs need nothing. On CPU the cross-process collectives use gloo.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: this process's index in ``[0, num_processes)``.

  Returns:
    True if ``jax.distributed.initialize`` was called.
  """
  coordinator_address = coordinator_address or os.environ.get(_ENV_COORDINATOR)
  if num_processes is None and _ENV_NUM_PROCESSES in os.environ:
    num_processes = int(os.environ[_ENV_NUM_PROCESSES])
  if process_id is None and _ENV_PROCESS_ID in os.environ:
    process_id = int(os.environ[_ENV_PROCESS_ID])
  in_cluster = any(v in os.environ for v in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"))
  if coordinator_address is None and num_processes is None and not in_cluster:
    return False
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1; got {num_processes}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}); got {process_id}")
  # Only CPU collectives read this setting; it must be set before the backend starts, so no backend query here.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  return True


def make_mesh(num_devices: int | None = None, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``"data"`` over all devices (of all processes), or the first ``num_devices`` of them.

  Args:
    num_devices: how many devices to use; default all.
    devices: explicit devices (overrides ``num_devices``).

  Returns:
    A ``Mesh`` whose single axis has the Auto axis type (see the module docstring).
  """
  if devices is None:
    all_devices = jax.devices()
    if num_devices is None:
      num_devices = len(all_devices)
    if not 1 <= num_devices <= len(all_devices):
      raise ValueError(f"num_devices must be in [1, {len(all_devices)}]; got {num_devices}")
    devices = all_devices[:num_devices]
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ``"data"``, the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def process_batch_slice(global_batch_size: int) -> slice:
  """The rows of a global batch that this process feeds (contiguous, in process order)."""
  process_count, process_index = jax.process_count(), jax.process_index()
  if global_batch_size % process_count:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the process count {process_count}"
    )
  rows = global_batch_size // process_count
  return slice(process_index * rows, (process_index + 1) * rows)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Places this process's rows of a global batch onto the mesh, sharded on ``"data"``.

  Args:
    tree: a pytree of host arrays whose leading dimension is this process's share of the global batch (the whole
      batch when there is one process).
    mesh: the mesh from :func:`make_mesh`.

  Returns:
    The same pytree of global ``jax.Array``\\ s, leading dimension ``local_rows * process_count``.
  """
  sharding = batch_sharding(mesh)
  num_devices = mesh.devices.size

  def place(leaf: Any) -> jax.Array:
    leaf = np.asarray(leaf)
    global_rows = leaf.shape[0] * jax.process_count()
    if leaf.ndim == 0 or global_rows % num_devices:
      raise ValueError(
          f"cannot shard an array of local shape {leaf.shape} over {num_devices} devices: the global batch "
          f"({global_rows} rows) must be divisible by the device count"
      )
    return jax.make_array_from_process_local_data(sharding, leaf, (global_rows, *leaf.shape[1:]))

  return jax.tree.map(place, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts a pytree (e.g. the train state) on every device of the mesh, across processes too.

  Every process must hold the same values (e.g. initialised from the same seed): each one places its own copy
  on its own devices. Typed PRNG keys are placed through their raw key data.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def place(leaf: Any) -> jax.Array:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(place(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
    # device_put cannot target other processes' devices; each process fills its own shards.
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(place, tree)
