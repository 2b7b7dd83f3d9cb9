"""ConvFirst block forward (inference form, BatchNorm folded) with the pointwise half in
one Mosaic GPU kernel:

    z = grouped_conv_kxk(x)                 XLA (group width 8), x.dtype
    y = x + fc2(silu(fc1(z + conv_bias)))   ``mosaic_mlp.fused_mlp`` (no normalisation)

The E*C-wide hidden activation never reaches DRAM; z (C wide) does, once each way."""

from __future__ import annotations

import jax

from pallas_kernels import mosaic_mlp
from pallas_kernels.convfirst_block.reference import ConvFirstBlockParams, grouped_conv


def unsupported_reason(x_shape, params: ConvFirstBlockParams, dtype) -> str | None:
  n, h, w, c = x_shape
  return mosaic_mlp.unsupported_reason(n * h * w, c, params.fc1_kernel.shape[1], dtype)


def default_mlp_block_m(c: int, e: int, itemsize: int = 2) -> int:
  """Rows per CTA of the ConvFirst block's MLP kernel: 128 (two compute warpgroups sharing
  each weight chunk) for 128 < C <= 256 where it fits shared memory, else 64.  H100,
  2026-11-27, three 28x28x192 blocks (E=4, batch 128, in the padded-row form): 0.729 ms with
  128 rows vs 0.867 with 64; 56x56x96: 64 rows (128 measured slower there, ninth session:
  1.193-1.229 vs 1.155-1.163 ms at batch 128, 2.320-2.333 vs 2.155-2.234 at 256)."""
  if 128 < c <= 256 and mosaic_mlp.fused_smem_bytes(c, e, 64, 2, 128, itemsize) + (
      mosaic_mlp._SMEM_SLACK) <= mosaic_mlp.SMEM_BYTES:
    return 128
  return 64


def forward(x: jax.Array, params: ConvFirstBlockParams, *, hidden_chunk: int = 64,
            stages: int = 2, h_in_smem: bool | None = None, block_m: int | None = None,
            interpret: bool = False) -> jax.Array:
  """The block with the MLP kernel at ``block_m`` rows per CTA (None:
  ``default_mlp_block_m``)."""
  n, h, w, c = x.shape
  if block_m is None:
    block_m = default_mlp_block_m(c, params.fc1_kernel.shape[1], x.dtype.itemsize)
  rows = n * h * w
  z = grouped_conv(x, params.conv_kernel)
  y = mosaic_mlp.fused_mlp(
      z.reshape(rows, c), x.reshape(rows, c), params.fc1_kernel, params.fc1_bias,
      params.fc2_kernel, params.fc2_bias, z_bias=params.conv_bias, act="silu",
      normalize=False, hidden_chunk=hidden_chunk, stages=stages, h_in_smem=h_in_smem,
      block_m=block_m,
      interpret=interpret)
  return y.reshape(n, h, w, c)
