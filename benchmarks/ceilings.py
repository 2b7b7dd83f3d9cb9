"""The two ceilings behind the block benchmarks' waterline floor, max(FLOPs / peak,
bytes / bandwidth): which GPU's they are.

The constants were measured on an H100 80GB HBM3 (2026-11-23): XLA's bfloat16 matmul at
680 TFLOP/s and a streaming kernel at 2.0 TB/s.  On any other GPU they would make the floor
and the efficiency column describe the H100, not the GPU that ran the benchmark, so
``--ceilings auto`` (the default of ``benchmarks.blocks``, ``benchmarks.blocks_convfirst``
and ``benchmarks.mosaic_blocks``) uses them on that H100 only and measures the running
GPU's otherwise (``convfirst_jax.analysis.devices.measure_ceilings``: an 8192^3 bfloat16
XLA matmul and x + 1 over 1 GiB, a few seconds).  Without a GPU (smoke runs on a CPU) the
floor is not meaningful and ``auto`` keeps the H100 constants, saying so.  ``h100`` forces
the constants (to compare efficiencies across GPUs against one yardstick), ``measure``
measures on any device.
"""

from __future__ import annotations

import dataclasses

import jax

from convfirst_jax.analysis.devices import get_device, measure_ceilings

H100_KIND = "NVIDIA H100 80GB HBM3"
MODES = ("auto", "h100", "measure")


@dataclasses.dataclass(frozen=True)
class Ceilings:
  flops: float  # FLOP/s, bfloat16 dense matmul
  bytes_per_s: float  # streaming DRAM bandwidth
  source: str

  def floor_s(self, flops: float, bytes_: float) -> float:
    return max(flops / self.flops, bytes_ / self.bytes_per_s)

  def describe(self) -> str:
    return (f"floor = max(FLOPs / {self.flops / 1e12:.0f} TFLOP/s, bytes / "
            f"{self.bytes_per_s / 1e12:.2f} TB/s) ({self.source})")


_H100_MEASURED = get_device("h100-measured")  # the analysis tools' figures, one source
H100 = Ceilings(_H100_MEASURED.peak("bfloat16"), _H100_MEASURED.dram_bandwidth,
                "H100 80GB HBM3 ceilings measured 2026-11-23")


def resolve(mode: str = "auto", *, matmul_size: int = 8192,
            copy_bytes: int = 1 << 30) -> Ceilings:
  """The ceilings ``mode`` names, on jax's default device (see the module docstring)."""
  if mode not in MODES:
    raise ValueError(f"ceilings must be one of {MODES}, got {mode!r}")
  kind = jax.devices()[0].device_kind
  if mode == "h100":
    return H100
  if mode == "auto":
    if kind == H100_KIND:
      return H100
    if jax.default_backend() != "gpu":
      return dataclasses.replace(
          H100, source=f"{H100.source}; no GPU here ({kind}), so the floor is the H100's")
  d = measure_ceilings(matmul_size=matmul_size, copy_bytes=copy_bytes)
  return Ceilings(d.peak("bfloat16"), d.dram_bandwidth,
                  f"measured on this {kind}: {matmul_size}^3 bf16 XLA matmul, "
                  f"{copy_bytes >> 20} MiB x + 1")


def add_argument(parser) -> None:
  parser.add_argument("--ceilings", choices=MODES, default="auto",
                      help="the floor's peak FLOP/s and bandwidth: auto = the H100 constants "
                           "on an H100 80GB HBM3 (and without a GPU), measured on any other "
                           "GPU; h100 = the constants; measure = measured here")
