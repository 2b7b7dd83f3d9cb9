"""Pytrees of arrays as a few flat buffers, for the arguments of jitted calls.

Every array argument of a jitted call costs host time at each call (flattening, buffer
handling, donation).  A model's weights are hundreds of arrays (ConvNeXt-T: ~180 as an
``nnx.State``, 549 in a training state with AdamW moments), and on an H100 machine's host
that cost is milliseconds per call -- time the GPU sits idle between synchronised calls, and
the whole call time of small models and batches.  ``TreePacker`` packs such a pytree into
one flat buffer per dtype and unpacks it inside the jitted function, where the slices are
free views or fuse into their consumers; ``predictor`` uses it for inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


class TreePacker:
  """Packs a pytree of arrays into ``{dtype name: 1-D buffer, "loose": [...]}``: the raveled
  leaves of each dtype concatenated (typed PRNG keys, which cannot be concatenated, stay
  separate in "loose"); ``unpack`` slices them back.  Both are traceable, so a jitted
  function can take the packed form and unpack at its start (and a train step pack its new
  state at its end: one more write of the state on the device)."""

  # Every leaf starts at a multiple of this many *elements*: XLA passes an unpacked leaf that
  # feeds a custom call (a Pallas kernel's weights) as a view into the packed buffer, and
  # Mosaic GPU calls require 256-byte aligned inputs ("Input buffer 3 is not 256-byte
  # aligned" on the H100 with unaligned offsets).  It can also convert a whole run of the
  # packed float32 buffer to bfloat16 in one fusion and pass the weight as a view into *that*
  # (convfirst_t's MBConv project weights, 2026-11-27), where a 256-byte float32 offset is
  # only 128 bytes: 256 elements keep every view aligned after any conversion to a type of
  # one byte or more.
  ALIGN_ELEMENTS = 256

  def __init__(self, template):
    leaves, self.treedef = jax.tree.flatten(template)
    self.slots = []   # per leaf: (group, offset, shape); group None: loose, offset = index
    sizes: dict[str, int] = {}
    self.loose = 0
    for leaf in leaves:
      if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        self.slots.append((None, self.loose, leaf.shape))
        self.loose += 1
        continue
      group = jnp.dtype(leaf.dtype).name
      align = self.ALIGN_ELEMENTS
      offset = -(-sizes.get(group, 0) // align) * align
      self.slots.append((group, offset, tuple(leaf.shape)))
      sizes[group] = offset + math.prod(leaf.shape)
    self.sizes = sizes
    self.dtypes = {g: jnp.dtype(g) for g in sizes}

  @property
  def num_leaves(self) -> int:
    return len(self.slots)

  def pack(self, state) -> dict:
    """{dtype name: 1-D buffer, "loose": [typed keys]} (traceable)."""
    leaves, treedef = jax.tree.flatten(state)
    if treedef != self.treedef:
      raise ValueError(f"state does not match the packer's layout: expected {self.treedef}, "
                       f"got {treedef}")
    parts: dict[str, list] = {g: [] for g in self.sizes}
    ends = dict.fromkeys(self.sizes, 0)
    loose = []
    for leaf, (group, offset, shape) in zip(leaves, self.slots):
      if tuple(leaf.shape) != tuple(shape):
        raise ValueError(f"state leaf of shape {leaf.shape} where the layout has {shape}")
      if group is None:
        loose.append(leaf)
        continue
      if offset > ends[group]:  # alignment padding
        parts[group].append(jnp.zeros((offset - ends[group],), self.dtypes[group]))
      parts[group].append(jnp.ravel(leaf))
      ends[group] = offset + math.prod(shape)
    out = {g: (jnp.concatenate(v) if v else jnp.zeros((0,), self.dtypes[g]))
           for g, v in parts.items()}
    out["loose"] = loose
    return out

  def unpack(self, packed: dict):
    """The pytree ``pack`` was given, from its result (traceable)."""
    leaves = []
    for group, off, shape in self.slots:
      if group is None:
        leaves.append(packed["loose"][off])
      else:
        size = math.prod(shape)
        leaves.append(jax.lax.slice(packed[group], (off,), (off + size,)).reshape(shape))
    return jax.tree.unflatten(self.treedef, leaves)


def predictor(model: nnx.Module, mesh: jax.sharding.Mesh | None = None
              ) -> Callable[[jax.Array], jax.Array]:
  """``x -> model(x)``, jitted, with the model's state (weights, batch statistics, RNG
  state) passed packed: a few arrays per call instead of one per weight.

  A snapshot: the weights are packed when ``predictor`` is called (put the model in the
  mode you want -- ``model.eval()`` -- first, and call ``predictor`` again after changing
  it).  ``jax.jit(lambda m, x: m(x))(model, x)`` flattens the whole module on the host at
  every call; ``python -m benchmarks.models`` times models through this function.

  mesh: run data-parallel over its devices -- the weights replicated, each batch split over
  every axis of the mesh (its size must divide the batch; the axes are used as
  ``AxisType.Auto`` whatever their type), the calls traced under
  ``jax.set_mesh(mesh)`` so that the Pallas kernels run per device
  (``pallas_kernels._sharding``); the logits come back split the same way.  Inputs
  already placed with the returned function's ``input_sharding`` are not copied."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  graphdef, state = nnx.split(model)
  packer = TreePacker(state)
  packed = jax.jit(packer.pack)(state)
  fn = jax.jit(lambda p, x: nnx.merge(graphdef, packer.unpack(p))(x))
  if mesh is None:
    return lambda x: fn(packed, x)
  # The models are written for XLA's automatic partitioning (reshapes etc. carry no
  # out_sharding), so the mesh's axes are used as Auto ones (jax.make_mesh makes Explicit).
  mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names)
  packed = jax.device_put(packed, NamedSharding(mesh, P()))
  batch_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))

  def predict(x: jax.Array) -> jax.Array:
    if not jnp.ndim(x) or x.shape[0] % mesh.size:
      raise ValueError(f"predictor(mesh=...): the batch of input {tuple(jnp.shape(x))} must "
                       f"be a multiple of the mesh's {mesh.size} devices; pad it or use a "
                       "smaller mesh")
    with jax.set_mesh(mesh):
      return fn(packed, jax.device_put(x, batch_sharding))

  predict.input_sharding = batch_sharding
  return predict
