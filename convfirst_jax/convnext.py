"""ConvNeXt (Liu et al., 2022) in Flax NNX, structured like timm's ``convnext.py``.

Module paths match timm's state-dict names (``stem[0]``, ``stages[i].downsample[1]``,
``stages[i].blocks[j].mlp.fc1``, ``head.fc`` ...), so weights convert one-to-one
(``convfirst_jax.timm_convert``).  Every block computes

    x + drop_path(gamma * fc2(gelu(fc1(LN(dwconv7x7(x))))))

through ``pallas_kernels.convnext_block``, which runs either plain XLA ops or the fused
Pallas kernel (``implementation=``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from convfirst_jax.layers import (ChannelLayerNorm, DropPath, PatchConv, check_implementation,
                                  check_input)

LN_EPS = 1e-6


def _trunc_normal(std: float = 0.02):
  return nnx.initializers.truncated_normal(stddev=std)


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_trunc_normal(),
              bias_init=nnx.initializers.zeros, rngs=rngs)
    self.fc1 = nnx.Linear(dim, hidden, **kw)
    self.fc2 = nnx.Linear(hidden, dim, **kw)


class ConvNeXtBlock(nnx.Module):
  """dwconv k x k -> LayerNorm -> Dense(C->rC) -> GELU -> Dense(rC->C) -> gamma -> drop path -> + x."""

  def __init__(self, dim: int, *, kernel_size: int = 7, mlp_ratio: float = 4.0,
               ls_init_value: float | None = 1e-6, drop_path: float = 0.0,
               implementation: str | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dim = dim
    self.implementation = check_implementation(implementation)
    self.conv_dw = nnx.Conv(dim, dim, (kernel_size, kernel_size), padding="SAME",
                            feature_group_count=dim, dtype=dtype, param_dtype=param_dtype,
                            kernel_init=_trunc_normal(), bias_init=nnx.initializers.zeros,
                            rngs=rngs)
    self.norm = nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
    self.mlp = Mlp(dim, int(mlp_ratio * dim), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if ls_init_value is not None:
      self.gamma = nnx.Param(jnp.full((dim,), ls_init_value, param_dtype))
    else:
      self.gamma = nnx.data(None)
    self.drop_path = DropPath(drop_path, rngs=rngs)
    self.dtype = dtype

  def block_params(self) -> pallas_kernels.ConvNeXtBlockParams:
    k = self.conv_dw.kernel.shape[0]
    gamma = (self.gamma[...] if self.gamma is not None
             else jnp.ones((self.dim,), self.conv_dw.kernel.dtype))
    return pallas_kernels.ConvNeXtBlockParams(
        dw_kernel=self.conv_dw.kernel[...].reshape(k, k, self.dim),
        dw_bias=self.conv_dw.bias[...],
        ln_scale=self.norm.scale[...], ln_bias=self.norm.bias[...],
        fc1_kernel=self.mlp.fc1.kernel[...], fc1_bias=self.mlp.fc1.bias[...],
        fc2_kernel=self.mlp.fc2.kernel[...], fc2_bias=self.mlp.fc2.bias[...],
        gamma=gamma)

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.drop_path.scale(x.shape[0])
    return pallas_kernels.convnext_block(
        x.astype(self.dtype), self.block_params(), scale, eps=LN_EPS,
        implementation=self.implementation)


class ConvNeXtStage(nnx.Module):
  def __init__(self, in_dim: int, out_dim: int, depth: int, *, downsample: bool,
               drop_path_rates: Sequence[float], kernel_size: int, mlp_ratio: float,
               ls_init_value: float | None, implementation: str | None, dtype, param_dtype,
               rngs: nnx.Rngs):
    if downsample:
      self.downsample = nnx.List([
          ChannelLayerNorm(in_dim, implementation=implementation, epsilon=LN_EPS,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs),
          nnx.Conv(in_dim, out_dim, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype,
                   param_dtype=param_dtype, kernel_init=_trunc_normal(),
                   bias_init=nnx.initializers.zeros, rngs=rngs),
      ])
    else:
      if in_dim != out_dim:
        raise ValueError(f"a stage without downsampling keeps its width: {in_dim} != {out_dim}")
      self.downsample = nnx.data(None)
    self.blocks = nnx.List([
        ConvNeXtBlock(out_dim, kernel_size=kernel_size, mlp_ratio=mlp_ratio,
                      ls_init_value=ls_init_value, drop_path=drop_path_rates[i],
                      implementation=implementation, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)
        for i in range(depth)
    ])

  def __call__(self, x):
    if self.downsample is not None:
      for layer in self.downsample:
        x = layer(x)
    for block in self.blocks:
      x = block(x)
    return x


class ClassifierHead(nnx.Module):
  """Global average pool -> LayerNorm -> Dense."""

  def __init__(self, dim: int, num_classes: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
    self.fc = nnx.Linear(dim, num_classes, dtype=dtype, param_dtype=param_dtype,
                         kernel_init=_trunc_normal(), bias_init=nnx.initializers.zeros,
                         rngs=rngs)

  def __call__(self, x):
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return self.fc(self.norm(x)).astype(jnp.float32)


def drop_path_schedule(depths: Sequence[int], rate: float) -> list[list[float]]:
  """Linearly increasing stochastic-depth rate over all blocks (0 .. rate), per stage."""
  total = sum(depths)
  rates = [rate * i / max(total - 1, 1) for i in range(total)]
  out, start = [], 0
  for d in depths:
    out.append(rates[start:start + d])
    start += d
  return out


class ConvNeXt(nnx.Module):
  """ConvNeXt: stem (4x4/4 conv + LN), four stages, head (pool + LN + Dense).

  Args:
    depths, dims: blocks and channels per stage.
    num_classes: head outputs (0 keeps the head's LayerNorm and drops the Dense).
    in_chans: input channels.
    kernel_size, mlp_ratio, ls_init_value: block hyper-parameters (timm's defaults).
    drop_path_rate: stochastic depth, increasing linearly to this value.
    block_impl: "xla" | "pallas" | None, passed to every block.
    dtype: compute dtype (bfloat16 on GPU); param_dtype: parameter dtype (float32).
  """

  def __init__(self, depths: Sequence[int] = (3, 3, 9, 3),
               dims: Sequence[int] = (96, 192, 384, 768), *, num_classes: int = 1000,
               in_chans: int = 3, kernel_size: int = 7, mlp_ratio: float = 4.0,
               ls_init_value: float | None = 1e-6, drop_path_rate: float = 0.0,
               block_impl: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if len(depths) != len(dims):
      raise ValueError(f"depths {tuple(depths)} and dims {tuple(dims)} differ in length")
    self.depths, self.dims = tuple(depths), tuple(dims)
    self.in_chans = in_chans
    self.num_classes = num_classes
    self.block_impl = check_implementation(block_impl)
    self.dtype = dtype
    self.stem = nnx.List([
        PatchConv(in_chans, dims[0], (4, 4), strides=(4, 4), padding="VALID", dtype=dtype,
                 param_dtype=param_dtype, kernel_init=_trunc_normal(),
                 bias_init=nnx.initializers.zeros, rngs=rngs),
        ChannelLayerNorm(dims[0], implementation=block_impl, epsilon=LN_EPS, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs),
    ])
    dp = drop_path_schedule(depths, drop_path_rate)
    self.stages = nnx.List([
        ConvNeXtStage(dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0,
                      drop_path_rates=dp[i], kernel_size=kernel_size, mlp_ratio=mlp_ratio,
                      ls_init_value=ls_init_value, implementation=block_impl, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
        for i in range(len(depths))
    ])
    self.head = ClassifierHead(dims[-1], num_classes, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs) if num_classes > 0 else nnx.data(None)

  @property
  def total_stride(self) -> int:
    return 4 * 2 ** (len(self.depths) - 1)

  def forward_features(self, x: jax.Array) -> jax.Array:
    check_input(x, self.in_chans, self.total_stride, type(self).__name__)
    x = x.astype(self.dtype)
    for layer in self.stem:
      x = layer(x)
    for stage in self.stages:
      x = stage(x)
    return x

  def forward_head(self, x: jax.Array) -> jax.Array:
    if self.head is None:
      return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return self.head(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.forward_head(self.forward_features(x))
