"""Waterline analysis (the paper's roofline argument): the latency floor of a sequence of kernels,

    floor = sum over kernels of max(FLOPs / peak_flops, min_bytes / dram_bandwidth),

for two partitions of the same model:

* unfused: every layer is its own kernel, so every intermediate goes through DRAM
  (written by one kernel, read by the next);
* fused: every block group (each residual block, and the stem, each downsample and the
  head) is one kernel, so only its input, its weights and its output touch DRAM.

``analyze(model, image_size, batch, device, dtype)`` returns a ``Waterline`` holding, per
block group, the fused kernel's floor and the per-layer floors of the unfused partition.
"""

from __future__ import annotations

import dataclasses

from convfirst_jax.analysis.counts import BlockCount, LayerCount, block_counts, layer_counts
from convfirst_jax.analysis.devices import Device


@dataclasses.dataclass(frozen=True)
class KernelFloor:
  """One kernel on the roofline: its FLOPs, minimum DRAM bytes and time floor."""
  name: str
  kind: str
  flops: int
  min_bytes: int
  compute_s: float    # flops / peak
  memory_s: float     # min_bytes / bandwidth

  @property
  def time_s(self) -> float:
    return max(self.compute_s, self.memory_s)

  @property
  def intensity(self) -> float:
    """Operational intensity, FLOP per minimum DRAM byte."""
    return self.flops / max(self.min_bytes, 1)

  @property
  def bound(self) -> str:
    return "compute" if self.compute_s >= self.memory_s else "memory"

  def to_dict(self) -> dict:
    return dict(name=self.name, kind=self.kind, flops=self.flops, min_bytes=self.min_bytes,
                intensity=self.intensity, compute_s=self.compute_s, memory_s=self.memory_s,
                time_s=self.time_s, bound=self.bound)


def kernel_floor(name: str, kind: str, flops: int, min_bytes: int, device: Device,
                 dtype: str = "bfloat16") -> KernelFloor:
  return KernelFloor(name, kind, int(flops), int(min_bytes), flops / device.peak(dtype),
                     min_bytes / device.dram_bandwidth)


def layer_floor(layer: LayerCount, device: Device, dtype: str = "bfloat16") -> KernelFloor:
  return kernel_floor(layer.name, layer.kind, layer.flops, layer.min_bytes(itemsize_of(dtype)),
                      device, dtype)


@dataclasses.dataclass(frozen=True)
class BlockFloor:
  """A block group and its floors in both partitions."""
  name: str
  kind: str                        # convnext | convfirst | mbconv | stem | downsample | head
  count: BlockCount
  fused: KernelFloor               # the whole group as one kernel
  layers: tuple[KernelFloor, ...]  # every layer its own kernel (the unfused partition)

  @property
  def unfused_s(self) -> float:
    return sum(l.time_s for l in self.layers)

  @property
  def unfused_bytes(self) -> int:
    return sum(l.min_bytes for l in self.layers)

  @property
  def unfused_intensity(self) -> float:
    return self.count.flops / max(self.unfused_bytes, 1)

  @property
  def residual(self) -> bool:
    return self.kind not in ("stem", "downsample", "head")

  def to_dict(self) -> dict:
    return dict(name=self.name, kind=self.kind, in_shape=list(self.count.in_shape),
                out_shape=list(self.count.out_shape), params=self.count.params,
                macs=self.count.macs, flops=self.count.flops,
                fused=self.fused.to_dict(), unfused_bytes=self.unfused_bytes,
                unfused_intensity=self.unfused_intensity, unfused_s=self.unfused_s,
                layers=[l.to_dict() for l in self.layers])


@dataclasses.dataclass(frozen=True)
class Waterline:
  model: str
  image_size: int
  batch: int
  dtype: str
  device: Device
  blocks: tuple[BlockFloor, ...]

  @property
  def flops(self) -> int:
    return sum(b.count.flops for b in self.blocks)

  @property
  def macs(self) -> int:
    return sum(b.count.macs for b in self.blocks)

  @property
  def params(self) -> int:
    return sum(b.count.params for b in self.blocks)

  @property
  def fused_s(self) -> float:
    """The fused partition's waterline: one kernel per block group."""
    return sum(b.fused.time_s for b in self.blocks)

  @property
  def unfused_s(self) -> float:
    """The unfused partition's waterline: one kernel per layer."""
    return sum(b.unfused_s for b in self.blocks)

  @property
  def fused_bytes(self) -> int:
    return sum(b.fused.min_bytes for b in self.blocks)

  @property
  def unfused_bytes(self) -> int:
    return sum(b.unfused_bytes for b in self.blocks)

  def to_dict(self) -> dict:
    d = self.device
    return dict(model=self.model, image_size=self.image_size, batch=self.batch,
                dtype=self.dtype,
                device=dict(name=d.name, peak_flops=d.peak(self.dtype),
                            dram_bandwidth=d.dram_bandwidth, source=d.source),
                params=self.params, macs=self.macs, flops=self.flops,
                fused_bytes=self.fused_bytes, unfused_bytes=self.unfused_bytes,
                fused_s=self.fused_s, unfused_s=self.unfused_s,
                blocks=[b.to_dict() for b in self.blocks])


def itemsize_of(dtype: str) -> int:
  return {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]


def block_kind(block: BlockCount) -> str:
  """What a block group is, from its name and first layer."""
  top = block.name.split(".")
  if top[0] in ("stem", "head"):
    return top[0]
  if top[-1] == "downsample":
    return "downsample"
  first = block.layers[0]
  if first.name.endswith("conv_dw"):
    return "convnext"
  return "mbconv" if first.kind == "dense" else "convfirst"


def analyze(model, image_size: int = 224, batch: int = 1, device: Device | None = None,
            dtype: str = "bfloat16", name: str = "") -> Waterline:
  """Waterline of ``model`` (a ConvNeXt or ConvFirstNet, concrete or ``nnx.eval_shape``)
  for ``batch`` images, activations and weights moved at ``dtype``."""
  if device is None:
    from convfirst_jax.analysis.devices import DEVICES
    device = DEVICES["h100"]
  itemsize = itemsize_of(dtype)
  blocks = []
  for blk in block_counts(layer_counts(model, image_size, batch)):
    kind = block_kind(blk)
    fused = kernel_floor(blk.name, kind, blk.flops, blk.min_bytes(itemsize), device, dtype)
    layers = tuple(layer_floor(l, device, dtype) for l in blk.layers)
    blocks.append(BlockFloor(blk.name, kind, blk, fused, layers))
  return Waterline(name or type(model).__name__, image_size, batch, dtype, device,
                   tuple(blocks))
