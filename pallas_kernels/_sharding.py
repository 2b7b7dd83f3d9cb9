"""Pallas kernels under data parallelism: each device runs its own slice of the batch.

A ``pallas_call`` lowers to a custom call that XLA's SPMD partitioner cannot split, so
inside a ``jax.jit`` whose batch is sharded over several devices it gathers the whole batch
onto every device and runs the kernel there on all of it (the same result, N times the
work and memory).  Every batch- or row-wise Pallas path of this package therefore goes
through ``map_batch``: when a mesh is set for tracing (``jax.set_mesh(mesh)``, as
``train`` does) it wraps the kernel call in ``jax.shard_map`` so that each device runs the
kernel on its own images, with the weights replicated; their gradients are summed over
the devices by shard_map's transpose.  Without a mesh (one device, or a caller that did
not set one) the call is unchanged.

The batch is split over every mesh axis that is not already manual (inside an enclosing
``shard_map``) and has more than one device, taken in the mesh's order while their
product divides the batch; splitting a function that is independent per image over any
axes is exact, so the only requirement is that the kernels see whole images.
``set_batch_sharding(False)`` turns the wrapping off (for comparisons).
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import PartitionSpec as P

_ENABLED = True


def set_batch_sharding(enabled: bool) -> bool:
  """Turns ``map_batch``'s shard_map on or off for calls traced from now on; returns the
  previous setting.  Off, Pallas kernels under a sharded batch run on the gathered batch
  on every device, as XLA's partitioner places them."""
  global _ENABLED
  previous, _ENABLED = _ENABLED, bool(enabled)
  return previous


@contextlib.contextmanager
def batch_sharding(enabled: bool):
  """``set_batch_sharding(enabled)`` for the duration of a ``with`` block."""
  previous = set_batch_sharding(enabled)
  try:
    yield
  finally:
    set_batch_sharding(previous)


def batch_axes(batch: int) -> tuple[str, ...]:
  """Mesh axes of the tracing context the batch (of this many images) is split over; ()
  when there is no mesh, every axis is manual or has one device, or the wrapping is off."""
  if not _ENABLED:
    return ()
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes, size = [], 1
  for name, n, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types):
    if kind == jax.sharding.AxisType.Manual or n == 1:
      continue
    if batch % (size * n) == 0:
      axes.append(name)
      size *= n
  return tuple(axes)


def local_batch(batch: int) -> int:
  """The images each device's kernel call sees: ``batch`` divided by the devices of
  ``batch_axes(batch)`` (``batch`` itself without a mesh).  Size thresholds measured on one
  GPU (``MIN_ROWS_FOR_PALLAS``, the MBConv stage's row overhead) apply to this."""
  axes = batch_axes(batch)
  if not axes:
    return batch
  mesh = jax.sharding.get_abstract_mesh()
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  devices = 1
  for a in axes:
    devices *= sizes[a]
  return batch // devices


def map_batch(fn, batched, replicated=(), *, batch: int, out_batched=True):
  """``fn(*batched, *replicated)`` with each device of the tracing mesh on its slice of the
  batch (see the module docstring), or a plain call when ``batch_axes(batch)`` is empty.

  batched: arrays (or pytrees of arrays) whose leading axis is the batch of ``batch``
  images, or rows that are whole images' pixels in order (N*H*W rows); replicated: the
  rest (weights).  out_batched: a pytree prefix of fn's output, True where the leading axis
  is the batch (or rows), False where the output is the same on every device."""
  axes = batch_axes(batch)
  if not axes:
    return fn(*batched, *replicated)
  spec = P(axes)
  in_specs = tuple(spec for _ in batched) + tuple(P() for _ in replicated)
  out_specs = jax.tree.map(lambda b: spec if b else P(), out_batched)
  mapped = jax.shard_map(lambda *args: fn(*args), in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)
  return mapped(*batched, *replicated)
