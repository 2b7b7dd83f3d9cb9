"""The MBConv block in *training* form (BatchNorm with batch statistics), its three
BatchNorms as ``batchnorm.batch_norm_act``: hand-written backward passes with the
per-channel reductions as Pallas-Triton kernels.

The training-form block (``convfirst_jax.MBConvBlock``):

    a = x W1   h = silu(BN_1(a))   g = gconv(h)   u = silu(BN_g(g))   p = u W2
    y = x + BN_2(p)

(x: (M, C) rows of the N*H*W pixels; a, h, g, u: (M, E), E = 4C; BN with batch
statistics per channel over all M rows; drop path scales BN_2(p) per image.)

Run as written, XLA lowers each BatchNorm's statistics and the two per-channel sums of its
backward to column reductions that run well below DRAM bandwidth, and autodiff of the
bfloat16 BatchNorm materialises float32 E-wide intermediates.  Here each BatchNorm (+ SiLU)
is one ``custom_vjp`` that keeps only its bfloat16 input: forward = a statistics kernel and
one XLA pass writing the activation; backward = a sums kernel and one XLA pass writing the
input gradient.  The grouped conv and both matrix products are XLA's (cuDNN / cuBLAS).

Measured and not used: folding BN_1 into the expansion from x's moments (as the ConvFirst
training block does; ``train.fold_batchnorm_dense``) with a recomputing expansion backward
-- 0.898 vs 0.855 ms at 14x14x256, 0.962 vs 0.849 at 7x7x768 (H200, batch 128, 2026-11-27):
its backward needs an E-wide float32 pass for the bias gradient and a second GEMM, more
than BN_1's own statistics and sums cost.

Public entry points: ``mbconv_block_train`` (y and the batch statistics for the running
averages), ``MBConvTrainParams``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import batchnorm
from pallas_kernels.convfirst_block.reference import GROUP_WIDTH, grouped_conv
from pallas_kernels.convfirst_block.train import (BatchStats, _bn_apply, _residual,
                                                  check_train_args, moments)

IMPLEMENTATIONS = ("xla", "pallas")


class MBConvTrainParams(NamedTuple):
  """fc1_kernel (C, E); bn1 (scale, bias) (E,); conv_kernel (k, k, 8, E); bn_conv (E,);
  fc2_kernel (E, C); bn2 (C,).  The convs and matrix products have no bias (BatchNorm
  follows each)."""

  fc1_kernel: jax.Array
  bn1_scale: jax.Array
  bn1_bias: jax.Array
  conv_kernel: jax.Array
  bn_conv_scale: jax.Array
  bn_conv_bias: jax.Array
  fc2_kernel: jax.Array
  bn2_scale: jax.Array
  bn2_bias: jax.Array


def _check(x, params: MBConvTrainParams, name: str) -> tuple[int, int]:
  c = x.shape[-1] if x.ndim else 0
  e = params.fc1_kernel.shape[-1]
  if e % GROUP_WIDTH:
    raise ValueError(f"{name}: the hidden width ({e}) must be a multiple of the group width "
                     f"{GROUP_WIDTH}")
  check_train_args(x, params, name, e, {
      "fc1_kernel": (c, e), "bn1_scale": (e,), "bn1_bias": (e,), "bn_conv_scale": (e,),
      "bn_conv_bias": (e,), "fc2_kernel": (e, c), "bn2_scale": (c,), "bn2_bias": (c,)})
  return c, e


def _mbconv_xla(x, params, drop_scale, eps):
  """The block as written (what flax's modules compute), for implementation="xla"."""
  dtype = x.dtype
  n, h, w, c = x.shape
  e = params.fc1_kernel.shape[-1]
  a = jnp.dot(x.reshape(-1, c), params.fc1_kernel.astype(dtype))
  st_a = moments(a)
  hid = jax.nn.silu(_bn_apply(a, *st_a, params.bn1_scale, params.bn1_bias, eps).astype(dtype))
  g = grouped_conv(hid.reshape(n, h, w, e), params.conv_kernel).reshape(-1, e)
  st_g = moments(g)
  u = jax.nn.silu(_bn_apply(g, *st_g, params.bn_conv_scale, params.bn_conv_bias,
                            eps).astype(dtype))
  p = jnp.dot(u, params.fc2_kernel.astype(dtype))
  st_p = moments(p)
  branch = _bn_apply(p, *st_p, params.bn2_scale, params.bn2_bias, eps).astype(dtype)
  y = _residual(x, branch.astype(jnp.float32).reshape(n, h, w, c), drop_scale)
  return y, BatchStats(st_g, st_a, st_p)


def _mbconv_kernels(x, params, drop_scale, eps, bn_impl, interpret=False):
  """The block with every BatchNorm as ``batch_norm_act`` (reductions: ``bn_impl``)."""
  dtype = x.dtype
  n, h, w, c = x.shape
  e = params.fc1_kernel.shape[-1]
  bn = functools.partial(batchnorm.batch_norm_act, eps=eps, batch=n, implementation=bn_impl,
                         interpret=interpret)
  a = jnp.dot(x.reshape(-1, c), params.fc1_kernel.astype(dtype))
  hid, *st_a = bn(a, params.bn1_scale, params.bn1_bias, act="silu")
  g = grouped_conv(hid.reshape(n, h, w, e), params.conv_kernel).reshape(-1, e)
  u, *st_g = bn(g, params.bn_conv_scale, params.bn_conv_bias, act="silu")
  p = jnp.dot(u, params.fc2_kernel.astype(dtype))
  branch, *st_p = bn(p, params.bn2_scale, params.bn2_bias)
  y = _residual(x, branch.astype(jnp.float32).reshape(n, h, w, c), drop_scale)
  return y, BatchStats(tuple(st_g), tuple(st_a), tuple(st_p))


def mbconv_block_train(x: jax.Array, params: MBConvTrainParams,
                       drop_scale: jax.Array | None = None, *, eps: float = 1e-5,
                       implementation: str | None = None,
                       interpret: bool = False) -> tuple[jax.Array, BatchStats]:
  """MBConv training block: y = x + drop_scale * BN_2(silu(BN_g(gconv(silu(BN_1(x W1))))) W2),
  BatchNorms with batch statistics.  Returns (y, BatchStats(conv, fc1, fc2)) -- the batch
  (mean, var) of each BatchNorm's input, for the running averages; differentiable in x and
  every parameter.

  implementation: "xla" -- the block as written (autodiff of every op); "pallas" -- every
  BatchNorm a ``batchnorm.batch_norm_act`` with its reductions as Pallas-Triton kernels
  (ValueError naming the reason where they cannot run); None -- the same custom backward
  passes, each BatchNorm's reductions Pallas where ``batchnorm.picks_pallas`` picks them
  (a GPU, enough rows per device) and XLA's otherwise.
  The grouped conv and the matrix products are XLA's in every form.  drop_scale: (N,)
  per-image scale or None."""
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  _check(x, params, "mbconv_block_train")
  if implementation == "xla":
    return _mbconv_xla(x, params, drop_scale, eps)
  return _mbconv_kernels(x, params, drop_scale, eps, implementation, interpret)
