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


def forward(x: jax.Array, params: ConvFirstBlockParams, *, hidden_chunk: int = 64,
            stages: int = 2, h_in_smem: bool | None = None, block_m: int = 64,
            interpret: bool = False) -> jax.Array:
  n, h, w, c = x.shape
  rows = n * h * w
  z = grouped_conv(x, params.conv_kernel)
  y = mosaic_mlp.fused_mlp(
      z.reshape(rows, c), x.reshape(rows, c), params.fc1_kernel, params.fc1_bias,
      params.fc2_kernel, params.fc2_bias, z_bias=params.conv_bias, act="silu",
      normalize=False, hidden_chunk=hidden_chunk, stages=stages, h_in_smem=h_in_smem,
      block_m=block_m,
      interpret=interpret)
  return y.reshape(n, h, w, c)
