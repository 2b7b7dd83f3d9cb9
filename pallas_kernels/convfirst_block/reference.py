"""Pure-jnp inference (BatchNorm-folded) ConvFirst and MBConv blocks.

ConvFirst:  y = x + fc2(silu(fc1(gconv_kxk(x) + b0) + b1)) + b2
MBConv:     y = x + fc2(silu(gconv_kxk(silu(fc1(x) + b1)) + b0)) + b2

``gconv_kxk`` is a grouped convolution with group width 8 (groups = channels / 8), stride 1,
"same" padding.  Parameters may be float32 while ``x`` is bfloat16: operands are cast to
``x.dtype`` with float32 accumulation and intermediates are stored in ``x.dtype``, the way a
framework runs the block (this is also the ``implementation="xla"`` path); the fused kernels
keep intermediates in float32 on chip.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

GROUP_WIDTH = 8


class ConvFirstBlockParams(NamedTuple):
  """conv_kernel (k, k, 8, C), conv_bias (C,), fc1 (C, E*C) + (E*C,), fc2 (E*C, C) + (C,)."""

  conv_kernel: jax.Array
  conv_bias: jax.Array
  fc1_kernel: jax.Array
  fc1_bias: jax.Array
  fc2_kernel: jax.Array
  fc2_bias: jax.Array


class MBConvBlockParams(NamedTuple):
  """fc1 (C, E*C) + (E*C,), conv_kernel (k, k, 8, E*C), conv_bias (E*C,), fc2 (E*C, C) + (C,)."""

  fc1_kernel: jax.Array
  fc1_bias: jax.Array
  conv_kernel: jax.Array
  conv_bias: jax.Array
  fc2_kernel: jax.Array
  fc2_bias: jax.Array


def _check(x, params, conv_channels: int, name: str) -> None:
  if x.ndim != 4:
    raise ValueError(f"{name} expects NHWC input of rank 4, got shape {x.shape}")
  c = x.shape[-1]
  hidden = params.fc1_kernel.shape[-1]
  k = params.conv_kernel.shape[0]
  if c % GROUP_WIDTH or hidden % GROUP_WIDTH:
    raise ValueError(
        f"{name}: channels ({c}) and hidden width ({hidden}) must be multiples of the group "
        f"width {GROUP_WIDTH}")
  expected = {"fc1_kernel": (c, hidden), "fc1_bias": (hidden,), "fc2_kernel": (hidden, c),
              "fc2_bias": (c,), "conv_kernel": (k, k, GROUP_WIDTH, conv_channels),
              "conv_bias": (conv_channels,)}
  for field, shape in expected.items():
    actual = tuple(getattr(params, field).shape)
    if actual != shape:
      raise ValueError(f"{name}: params.{field} has shape {actual}, expected {shape} "
                       f"(x.shape={x.shape})")


def grouped_conv(x: jax.Array, kernel: jax.Array, *, stride: int = 1) -> jax.Array:
  """Group-width-8 "same" convolution in x.dtype (float32 accumulation)."""
  k = kernel.shape[0]
  pad = (k - 1) // 2
  return jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(stride, stride),
      padding=((pad, k - 1 - pad), (pad, k - 1 - pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=kernel.shape[-1] // kernel.shape[-2])


def _dense(x, kernel, bias):
  return jnp.dot(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)


def convfirst_block_reference(x: jax.Array, params: ConvFirstBlockParams) -> jax.Array:
  _check(x, params, x.shape[-1], "convfirst_block")
  dtype = x.dtype
  z = grouped_conv(x, params.conv_kernel) + params.conv_bias.astype(dtype)
  h = jax.nn.silu(_dense(z, params.fc1_kernel, params.fc1_bias))
  return x + _dense(h, params.fc2_kernel, params.fc2_bias)


def mbconv_block_reference(x: jax.Array, params: MBConvBlockParams) -> jax.Array:
  _check(x, params, params.fc1_kernel.shape[-1], "mbconv_block")
  dtype = x.dtype
  h = jax.nn.silu(_dense(x, params.fc1_kernel, params.fc1_bias))
  h = jax.nn.silu(grouped_conv(h, params.conv_kernel) + params.conv_bias.astype(dtype))
  return x + _dense(h, params.fc2_kernel, params.fc2_bias)
