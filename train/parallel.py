"""Data parallelism: one Mesh over every device, the batch sharded on 'data', the rest
replicated; multi-host through jax.distributed."""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Calls ``jax.distributed.initialize`` when any multi-host flag is given.

  All three are needed on a machine with no cluster environment (SLURM, ...) that jax
  detects by itself; every process runs the same command with its own ``process_id``.
  """
  if coordinator_address is None and num_processes is None and process_id is None:
    return
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be at least 1, got {num_processes}")
  if (process_id is not None and num_processes is not None
      and not 0 <= process_id < num_processes):
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def first_devices(num_devices: int | None) -> list:
  """The first ``num_devices`` of ``jax.devices()`` (all of them for None)."""
  devices = jax.devices()
  if num_devices is None:
    return devices
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
  return devices[:num_devices]


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  n, p = mesh.size, jax.process_count()
  if global_batch % n:
    raise ValueError(
        f"batch size {global_batch} is not divisible by the number of devices ({n}): the "
        f"batch is split evenly over them; use a multiple of {n}, e.g. "
        f"{max(n, global_batch // n * n)}")
  if global_batch % p:
    raise ValueError(f"batch size {global_batch} is not divisible by the number of "
                     f"processes ({p})")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_local_batch(arrays, mesh: Mesh):
  """Host arrays holding this process's slice of the global batch -> global jax.Arrays
  sharded over 'data' (asynchronous transfer)."""
  sharding = batch_sharding(mesh)
  return tuple(jax.make_array_from_process_local_data(sharding, np.asarray(a)) for a in arrays)


def jit_in_mesh(fn, mesh: Mesh, **jit_kwargs):
  """``jax.jit(fn, **jit_kwargs)`` whose every call runs, and so traces, under
  ``jax.set_mesh(mesh)``.  The Pallas kernels read the mesh while tracing and run each
  device's slice of the batch in a ``shard_map`` (``pallas_kernels._sharding``); without it
  XLA gathers the whole batch onto every device for each kernel call."""
  jitted = jax.jit(fn, **jit_kwargs)

  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return jitted(*args, **kwargs)

  call.jitted = jitted
  return call
