"""Device ceilings for the roofline: peak arithmetic throughput and DRAM bandwidth.

The table holds datasheet numbers (dense, i.e. without 2:4 sparsity; tensor-core peak for
bfloat16 / float16, plain FP32 peak for float32).  Datasheet peaks are upper bounds that
real kernels do not reach: ``measure_ceilings()`` measures the two ceilings on the current
GPU (a large bf16 matmul through XLA, a large device copy) so that the waterline can be
drawn at what the hardware actually delivers.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.timing import median_seconds


@dataclasses.dataclass(frozen=True)
class Device:
  name: str
  peak_flops: dict          # dtype name -> FLOP/s
  dram_bandwidth: float     # bytes/s
  source: str

  def peak(self, dtype: str) -> float:
    try:
      return self.peak_flops[dtype]
    except KeyError:
      raise ValueError(f"{self.name}: no peak throughput for {dtype!r}; "
                       f"known: {sorted(self.peak_flops)}") from None


def _peaks(bf16_tflops: float, fp32_tflops: float) -> dict:
  t = 1e12
  return {"bfloat16": bf16_tflops * t, "float16": bf16_tflops * t, "float32": fp32_tflops * t}


DEVICES: dict[str, Device] = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: BF16 1,979 TFLOPS "with sparsity"
    # (989.5 dense), FP32 67 TFLOPS, HBM3 3.35 TB/s.
    "h100": Device("NVIDIA H100 SXM5 80GB", _peaks(989.5, 67.0), 3.35e12,
                   "NVIDIA H100 datasheet (SXM5)"),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM column: BF16 1,979 TFLOPS with sparsity
    # (989.5 dense), FP32 67 TFLOPS, HBM3e 4.8 TB/s.
    "h200": Device("NVIDIA H200 SXM 141GB", _peaks(989.5, 67.0), 4.8e12,
                   "NVIDIA H200 datasheet (SXM)"),
    # NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column: BF16 312 TFLOPS dense,
    # FP32 19.5 TFLOPS, HBM2e 2,039 GB/s.
    "a100": Device("NVIDIA A100 SXM 80GB", _peaks(312.0, 19.5), 2.039e12,
                   "NVIDIA A100 datasheet (80GB SXM)"),
    # NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity (121 dense), FP32 30.3 TFLOPS,
    # GDDR6 300 GB/s.
    "l4": Device("NVIDIA L4", _peaks(121.0, 30.3), 300e9, "NVIDIA L4 datasheet"),
    # NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090 column: peak BF16 tensor
    # TFLOPS with FP32 accumulate 165.2 dense (330.4 sparse), FP32 82.6 TFLOPS,
    # GDDR6X 1,008 GB/s.
    "rtx4090": Device("NVIDIA GeForce RTX 4090", _peaks(165.2, 82.6), 1.008e12,
                      "NVIDIA Ada GPU architecture whitepaper"),
    # What the project measured on an H100 80GB on 2026-11-23: XLA bf16 matmul 680 TFLOP/s,
    # streaming kernels 2.0 TB/s (a plain device copy reaches 3.0 TB/s).  The block
    # benchmarks' floors use the same two on that H100 (benchmarks/ceilings.py).
    "h100-measured": Device("NVIDIA H100 80GB, measured ceilings (2026-11-23)",
                            _peaks(680.0, 51.0), 2.0e12,
                            "measured on an H100 80GB, 2026-11-23: XLA bf16 matmul, "
                            "streaming kernels"),
}


def get_device(name: str) -> Device:
  key = name.lower().replace("_", "-")
  if key not in DEVICES:
    raise ValueError(f"unknown device {name!r}; known: {', '.join(DEVICES)}")
  return DEVICES[key]


def measure_ceilings(matmul_size: int = 8192, copy_bytes: int = 1 << 30,
                     dtype: str = "bfloat16", iters: int = 20) -> Device:
  """Measures the two ceilings on jax's default device and returns them as a Device.

  Peak: an (n, n) @ (n, n) matmul in ``dtype`` through XLA, 2 n^3 FLOPs.
  Bandwidth: ``y = x + 1`` over a ``copy_bytes`` array, counting the read and the write
  (a kernel that streams every byte once, like the memory-bound layers we bound).
  """
  import jax
  import jax.numpy as jnp
  dt = jnp.dtype(dtype)
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (matmul_size, matmul_size), dt)
  b = jax.random.normal(kb, (matmul_size, matmul_size), dt)
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dt))
  t_mm = median_seconds(matmul, a, b, warmup=3, iters=iters)
  peak = 2 * matmul_size ** 3 / t_mm
  del a, b
  n = copy_bytes // dt.itemsize
  x = jnp.zeros((n,), dt)
  stream = jax.jit(lambda x: x + jnp.asarray(1, dt))
  t_cp = median_seconds(stream, x, warmup=3, iters=iters)
  bandwidth = 2 * n * dt.itemsize / t_cp
  kind = jax.devices()[0].device_kind
  return Device(f"{kind}, measured ceilings", {dtype: peak}, bandwidth,
                f"measured: {matmul_size}^3 {dtype} XLA matmul, {copy_bytes >> 20} MiB x + 1")
