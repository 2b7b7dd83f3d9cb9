"""Generic helpers for Triton-lowered Pallas kernels: channel tiling, platform checks.

Written for the ConvFirst / MBConv kernels while no shared ``pallas_kernels._common`` existed;
nothing here is specific to those blocks, so it can move there unchanged.
"""

from __future__ import annotations

import jax


def next_power_of_2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def largest_power_of_2_dividing(n: int) -> int:
  return n & -n


def channel_tile(channels: int, *, max_tile: int = 128, min_tile: int = 16) -> int:
  """Power-of-two tile width for a channel axis that need not be a power of two.

  Triton blocks must have power-of-two sizes and its dots need K, N >= 16.  The widest power
  of two that divides ``channels`` (capped at ``max_tile``) covers it with no padding at all
  (96 = 3 x 32, 384 = 3 x 128); below ``min_tile`` the last tile is padded and masked.
  """
  return max(min(largest_power_of_2_dividing(channels), max_tile), min_tile)


def num_tiles(channels: int, tile: int) -> int:
  return -(-channels // tile)


def pallas_gpu_unsupported_reason(interpret: bool) -> str | None:
  """Why a Triton-lowered Pallas kernel cannot run here, or None when it can."""
  if interpret:
    return None
  backend = jax.default_backend()
  if backend != "gpu":
    return f"the default JAX backend is {backend!r}, not 'gpu' (pass interpret=True to run the kernel on CPU)"
  platform = jax.devices()[0].platform
  if platform != "gpu" and "cuda" not in platform:
    return f"device platform {platform!r} is not supported by the Triton lowering"
  return None
