"""ConvFirstNet: ConvFirst blocks at high resolution, MBConv blocks at low resolution.

The family follows *On the Efficiency of Convolutional Neural Networks* (Lavin, 2024):
put the spatial (grouped, group width 8) convolution *first*, on the narrow tensor, so the
wide expanded tensor only feeds 1x1 convolutions, and every block is one conv + two
matmuls that a fused kernel computes on chip.

Structure (NHWC):
  stem        4x4/4 conv (no bias) + BatchNorm
  stage i     [downsample: 2x2/2 conv (no bias) + BatchNorm, for i > 0] + depth_i blocks
              stages with ``block_types[i] == "convfirst"``:
                gconv kxk (group width 8) -> BN -> 1x1 C->E*C -> BN -> SiLU -> 1x1 E*C->C
                -> BN -> drop path -> + x
              stages with ``block_types[i] == "mbconv"``:
                1x1 C->E*C -> BN -> SiLU -> gconv kxk (group width 8) -> BN -> SiLU ->
                1x1 E*C->C -> BN -> drop path -> + x
  head        global average pool -> LayerNorm -> Dense

Variants (224x224, 1000 classes; multiply-adds from ``convfirst_jax.analysis``):
  convfirst_atto   dims (32, 64, 128, 256),  depths (2, 2, 4, 2)
  convfirst_nano   dims (64, 128, 256, 512), depths (2, 2, 6, 2)
  convfirst_t      dims (96, 192, 384, 768), depths (3, 3, 9, 3)  ~ ConvNeXt-T's 4.46 G MACs
  convfirst_s      dims (96, 192, 384, 768), depths (3, 3, 27, 3)
all with k = 3, expansion 4, group width 8, block types (convfirst, convfirst, mbconv,
mbconv).

``fold_batchnorm(model)`` returns the inference form: every BatchNorm folded into the
preceding conv's weight and bias, so each block is ``conv + bias, matmul + bias`` and runs
through ``pallas_kernels.convfirst_block`` / ``mbconv_block``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from pallas_kernels.convfirst_block import GROUP_WIDTH
from convfirst_jax.convnext import ClassifierHead, drop_path_schedule
from convfirst_jax.layers import (DropPath, PatchConv, apply_drop_path, check_implementation,
                                  check_input)

BN_EPS = 1e-5
BN_MOMENTUM = 0.9
BLOCK_TYPES = ("convfirst", "mbconv")


def _kaiming():
  return nnx.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")


def _bn(dim, *, zero_init=False, dtype, param_dtype, rngs):
  return nnx.BatchNorm(dim, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype,
                       param_dtype=param_dtype,
                       scale_init=nnx.initializers.zeros if zero_init else nnx.initializers.ones,
                       rngs=rngs)


def _gconv(channels, k, *, use_bias, dtype, param_dtype, rngs):
  if channels % GROUP_WIDTH:
    raise ValueError(
        f"grouped conv needs channels divisible by the group width {GROUP_WIDTH}, got {channels}")
  return nnx.Conv(channels, channels, (k, k), padding="SAME",
                  feature_group_count=channels // GROUP_WIDTH, use_bias=use_bias, dtype=dtype,
                  param_dtype=param_dtype, kernel_init=_kaiming(),
                  bias_init=nnx.initializers.zeros, rngs=rngs)


def _dense(din, dout, *, use_bias, dtype, param_dtype, rngs):
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=_kaiming(), bias_init=nnx.initializers.zeros, rngs=rngs)


def _update_running_stats(bn: nnx.BatchNorm, mean, var):
  """What ``nnx.BatchNorm`` does with batch statistics in training mode."""
  m = bn.momentum
  bn.mean[...] = jax.lax.stop_gradient(m * bn.mean[...] + (1 - m) * mean.astype(bn.mean.dtype))
  bn.var[...] = jax.lax.stop_gradient(m * bn.var[...] + (1 - m) * var.astype(bn.var.dtype))


class _Block(nnx.Module):
  """Shared constructor of the training-form blocks (convs without bias + BatchNorm)."""

  def __init__(self, dim: int, *, kernel_size: int = 3, expansion: int = 4,
               drop_path: float = 0.0, zero_init_last: bool = True,
               implementation: str | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    hidden = dim * expansion
    conv_dim = self.conv_channels(dim, hidden)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dim, self.hidden, self.kernel_size = dim, hidden, kernel_size
    self.implementation = check_implementation(implementation)
    self.dtype = dtype
    self.conv_group = _gconv(conv_dim, kernel_size, use_bias=False, **kw)
    self.bn_group = _bn(conv_dim, **kw)
    self.fc1 = _dense(dim, hidden, use_bias=False, **kw)
    self.bn1 = _bn(hidden, **kw)
    self.fc2 = _dense(hidden, dim, use_bias=False, **kw)
    self.bn2 = _bn(dim, zero_init=zero_init_last, **kw)
    self.drop_path = DropPath(drop_path, rngs=rngs)

  @staticmethod
  def conv_channels(dim: int, hidden: int) -> int:
    raise NotImplementedError

  def _train_block(self, block_train, x):
    """The block in training mode as one ``pallas_kernels`` training function
    (``convfirst_block_train`` / ``mbconv_block_train``), the running averages updated
    from the batch statistics it returns, as flax's BatchNorm modules would."""
    y, stats = block_train(x, self.train_params(), self.drop_path.scale(x.shape[0]),
                           eps=BN_EPS, implementation=self.implementation)
    for bn, (mean, var) in zip((self.bn_group, self.bn1, self.bn2), stats):
      _update_running_stats(bn, mean, var)
    return y

  def _grouped_conv(self, h):
    """The block's grouped conv where the block runs as flax modules (eval mode without
    folding, or "xla"): the Pallas kernels (forward, input and weight gradients;
    ``pallas_kernels.grouped_conv``) for implementation "pallas", XLA's (flax
    ``nnx.Conv``) for "xla" and None -- None stays on XLA because XLA's grouped conv was
    the faster one for training on an H100 (benchmarks/RESULTS.md).  BatchNorm, the 1x1
    convs and SiLU run in XLA here."""
    if self.implementation != "pallas":
      return self.conv_group(h)
    return pallas_kernels.grouped_conv(h.astype(self.dtype), self.conv_group.kernel[...],
                                       implementation=self.implementation)


class ConvFirstBlock(_Block):
  """gconv kxk -> BN -> 1x1 expand -> BN -> SiLU -> 1x1 project -> BN -> drop path -> + x.

  In training mode (BatchNorm with batch statistics) implementations None and "pallas" run
  ``pallas_kernels.convfirst_block_train``: the first two BatchNorms folded into the
  expansion from the conv output's mean and covariance, the pointwise half on the Mosaic GPU
  kernels ("pallas"; None where they run, else XLA GEMMs) -- the same function, gradients
  and running-average updates as the flax modules, which "xla" and eval mode run."""

  @staticmethod
  def conv_channels(dim, hidden):
    return dim

  def train_params(self) -> pallas_kernels.ConvFirstTrainParams:
    return pallas_kernels.ConvFirstTrainParams(
        self.conv_group.kernel[...], self.bn_group.scale[...], self.bn_group.bias[...],
        self.fc1.kernel[...], self.bn1.scale[...], self.bn1.bias[...], self.fc2.kernel[...],
        self.bn2.scale[...], self.bn2.bias[...])

  def __call__(self, x):
    x = x.astype(self.dtype)
    if self.implementation != "xla" and not self.bn1.use_running_average:
      return self._train_block(pallas_kernels.convfirst_block_train, x)
    h = self.bn_group(self._grouped_conv(x))
    h = jax.nn.silu(self.bn1(self.fc1(h)))
    h = self.bn2(self.fc2(h))
    return x + apply_drop_path(h, self.drop_path.scale(x.shape[0]))


class MBConvBlock(_Block):
  """1x1 expand -> BN -> SiLU -> gconv kxk -> BN -> SiLU -> 1x1 project -> BN -> drop path -> + x.

  In training mode implementations None and "pallas" run
  ``pallas_kernels.mbconv_block_train``: each BatchNorm (+ SiLU) with a hand-written
  backward whose per-channel reductions are Pallas kernels ("pallas"; None where they pick
  themselves) -- the same function, gradients and running-average updates as the flax
  modules, which "xla" and eval mode run."""

  @staticmethod
  def conv_channels(dim, hidden):
    return hidden

  def train_params(self) -> pallas_kernels.MBConvTrainParams:
    return pallas_kernels.MBConvTrainParams(
        self.fc1.kernel[...], self.bn1.scale[...], self.bn1.bias[...],
        self.conv_group.kernel[...], self.bn_group.scale[...], self.bn_group.bias[...],
        self.fc2.kernel[...], self.bn2.scale[...], self.bn2.bias[...])

  def __call__(self, x):
    x = x.astype(self.dtype)
    if self.implementation != "xla" and not self.bn1.use_running_average:
      return self._train_block(pallas_kernels.mbconv_block_train, x)
    h = jax.nn.silu(self.bn1(self.fc1(x)))
    h = jax.nn.silu(self.bn_group(self._grouped_conv(h)))
    h = self.bn2(self.fc2(h))
    return x + apply_drop_path(h, self.drop_path.scale(x.shape[0]))


class _FoldedBlock(nnx.Module):
  """Inference form: the block's BatchNorms folded into conv / matmul biases."""

  def __init__(self, dim: int, hidden: int, conv_dim: int, kernel_size: int, *,
               implementation: str | None, dtype, param_dtype):
    zeros = lambda *s: nnx.Param(jnp.zeros(s, param_dtype))
    self.conv_kernel = zeros(kernel_size, kernel_size, GROUP_WIDTH, conv_dim)
    self.conv_bias = zeros(conv_dim)
    self.fc1_kernel, self.fc1_bias = zeros(dim, hidden), zeros(hidden)
    self.fc2_kernel, self.fc2_bias = zeros(hidden, dim), zeros(dim)
    self.implementation = check_implementation(implementation)
    self.dtype = dtype

  def _params(self, cls):
    return cls(**{f: getattr(self, f)[...] for f in cls._fields})


class FoldedConvFirstBlock(_FoldedBlock):
  def __call__(self, x):
    return pallas_kernels.convfirst_block(
        x.astype(self.dtype), self._params(pallas_kernels.ConvFirstBlockParams),
        implementation=self.implementation)


class FoldedMBConvBlock(_FoldedBlock):
  def __call__(self, x):
    return pallas_kernels.mbconv_block(
        x.astype(self.dtype), self._params(pallas_kernels.MBConvBlockParams),
        implementation=self.implementation)


class ConvBN(nnx.Module):
  """conv (no bias) + BatchNorm; in folded form conv + bias.  ``patchify``: the conv as a
  matrix product over patches (``PatchConv``, for the 3-channel stem)."""

  def __init__(self, din, dout, kernel, stride, *, folded=False, patchify=False,
               implementation: str | None = None, dtype, param_dtype, rngs: nnx.Rngs):
    conv = PatchConv if patchify else nnx.Conv
    self.conv = conv(din, dout, (kernel, kernel), strides=(stride, stride),
                     padding="VALID", use_bias=folded, dtype=dtype,
                     param_dtype=param_dtype, kernel_init=_kaiming(),
                     bias_init=nnx.initializers.zeros, rngs=rngs)
    self.bn = nnx.data(None) if folded else _bn(dout, dtype=dtype, param_dtype=param_dtype,
                                                rngs=rngs)
    self.implementation = check_implementation(implementation)

  def __call__(self, x):
    x = self.conv(x)
    if self.bn is None:
      return x
    if self.implementation == "xla" or self.bn.use_running_average:
      return self.bn(x)
    # Training: batch statistics with batchnorm's hand-written backward, its reductions
    # Pallas kernels where they pick themselves (None) or always ("pallas").
    x = x.astype(self.bn.dtype or x.dtype)
    y, mean, var = pallas_kernels.batch_norm_act(
        x.reshape(-1, x.shape[-1]), self.bn.scale[...], self.bn.bias[...], eps=BN_EPS,
        batch=x.shape[0], implementation=self.implementation)
    _update_running_stats(self.bn, mean, var)
    return y.reshape(x.shape)


class ConvFirstStage(nnx.Module):
  def __init__(self, in_dim, out_dim, depth, *, block_type, downsample, drop_path_rates,
               kernel_size, expansion, zero_init_last, implementation, folded, dtype,
               param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.downsample = (ConvBN(in_dim, out_dim, 2, 2, folded=folded,
                              implementation=implementation, rngs=rngs, **kw)
                       if downsample else nnx.data(None))
    hidden = out_dim * expansion
    blocks = []
    for i in range(depth):
      if folded:
        cls = FoldedConvFirstBlock if block_type == "convfirst" else FoldedMBConvBlock
        conv_dim = out_dim if block_type == "convfirst" else hidden
        blocks.append(cls(out_dim, hidden, conv_dim, kernel_size,
                          implementation=implementation, **kw))
      else:
        cls = ConvFirstBlock if block_type == "convfirst" else MBConvBlock
        blocks.append(cls(out_dim, kernel_size=kernel_size, expansion=expansion,
                          drop_path=drop_path_rates[i], zero_init_last=zero_init_last,
                          implementation=implementation, rngs=rngs, **kw))
    self.blocks = nnx.List(blocks)
    self.folded_block_type = block_type if folded else None
    self.implementation = check_implementation(implementation)
    self.dtype = dtype

  def __call__(self, x):
    if self.downsample is not None:
      x = self.downsample(x)
    if self.folded_block_type is not None and len(self.blocks):
      # The whole stage in one call, so the Mosaic form (where it is picked) enters and
      # leaves its padded-row layout once (pallas_kernels.convfirst_stage / mbconv_stage).
      stage, params = ((pallas_kernels.mbconv_stage, pallas_kernels.MBConvBlockParams)
                       if self.folded_block_type == "mbconv" else
                       (pallas_kernels.convfirst_stage, pallas_kernels.ConvFirstBlockParams))
      return stage(x.astype(self.dtype), [b._params(params) for b in self.blocks],
                   implementation=self.implementation)
    for block in self.blocks:
      x = block(x)
    return x


class ConvFirstNet(nnx.Module):
  """ConvFirstNet (see module docstring).

  Args:
    depths, dims: blocks and channels per stage (channels multiples of 8).
    block_types: "convfirst" or "mbconv" per stage.
    kernel_size: k of the grouped convolutions (3 or 5).
    expansions: expansion ratio E per stage (int or sequence).
    num_classes, in_chans: head outputs (0: no Dense) and input channels.
    drop_path_rate: stochastic depth, increasing linearly to this value.
    zero_init_last: initialise each block's last BatchNorm scale to zero.
    block_impl: "xla" | "pallas" | None, passed to every block (and, for training, to
      the stem and downsampling BatchNorms: ``pallas_kernels.batch_norm_act`` unless "xla").
    folded: build the inference form (no BatchNorm; see ``fold_batchnorm``).
    dtype / param_dtype: compute and parameter dtypes.
  """

  def __init__(self, depths: Sequence[int] = (3, 3, 9, 3),
               dims: Sequence[int] = (96, 192, 384, 768), *,
               block_types: Sequence[str] = ("convfirst", "convfirst", "mbconv", "mbconv"),
               kernel_size: int = 3, expansions: int | Sequence[int] = 4,
               num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0,
               zero_init_last: bool = True, block_impl: str | None = None,
               folded: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    n = len(depths)
    if isinstance(expansions, int):
      expansions = (expansions,) * n
    if not (len(dims) == len(block_types) == len(expansions) == n):
      raise ValueError(
          f"depths {tuple(depths)}, dims {tuple(dims)}, block_types {tuple(block_types)} and "
          f"expansions {tuple(expansions)} must have the same length")
    for t in block_types:
      if t not in BLOCK_TYPES:
        raise ValueError(f"unknown block type {t!r}; expected one of {BLOCK_TYPES}")
    for d in dims:
      if d % GROUP_WIDTH:
        raise ValueError(f"every stage width must be a multiple of {GROUP_WIDTH}, got {d}")
    if kernel_size % 2 == 0:
      raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    self.config = dict(depths=tuple(depths), dims=tuple(dims), block_types=tuple(block_types),
                       kernel_size=kernel_size, expansions=tuple(expansions),
                       num_classes=num_classes, in_chans=in_chans,
                       drop_path_rate=drop_path_rate, zero_init_last=zero_init_last,
                       block_impl=block_impl, dtype=dtype, param_dtype=param_dtype)
    self.depths, self.dims = tuple(depths), tuple(dims)
    self.in_chans, self.num_classes = in_chans, num_classes
    self.block_impl = check_implementation(block_impl)
    self.folded = folded
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.stem = ConvBN(in_chans, dims[0], 4, 4, folded=folded, patchify=True,
                       implementation=block_impl, rngs=rngs, **kw)
    dp = drop_path_schedule(depths, drop_path_rate)
    self.stages = nnx.List([
        ConvFirstStage(dims[max(i - 1, 0)], dims[i], depths[i], block_type=block_types[i],
                       downsample=i > 0, drop_path_rates=dp[i], kernel_size=kernel_size,
                       expansion=expansions[i], zero_init_last=zero_init_last,
                       implementation=block_impl, folded=folded, rngs=rngs, **kw)
        for i in range(n)
    ])
    self.head = (ClassifierHead(dims[-1], num_classes, rngs=rngs, **kw)
                 if num_classes > 0 else nnx.data(None))

  @property
  def total_stride(self) -> int:
    return 4 * 2 ** (len(self.depths) - 1)

  def forward_features(self, x):
    check_input(x, self.in_chans, self.total_stride, type(self).__name__)
    x = self.stem(x.astype(self.dtype))
    for stage in self.stages:
      x = stage(x)
    return x

  def forward_head(self, x):
    if self.head is None:
      return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return self.head(x)

  def __call__(self, x):
    return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------- folding


def _bn_affine(bn: nnx.BatchNorm):
  """(s, t) such that bn(z) == z * s + t in eval mode."""
  s = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.epsilon)
  return s, bn.bias[...] - bn.mean[...] * s


def _fold_conv_bn(dst: nnx.Conv, conv: nnx.Conv, bn: nnx.BatchNorm):
  s, t = _bn_affine(bn)
  dst.kernel[...] = conv.kernel[...] * s
  dst.bias[...] = t


def _fold_block(dst: _FoldedBlock, src: _Block):
  s, t = _bn_affine(src.bn_group)
  dst.conv_kernel[...] = src.conv_group.kernel[...] * s
  dst.conv_bias[...] = t
  s, t = _bn_affine(src.bn1)
  dst.fc1_kernel[...] = src.fc1.kernel[...] * s
  dst.fc1_bias[...] = t
  s, t = _bn_affine(src.bn2)
  dst.fc2_kernel[...] = src.fc2.kernel[...] * s
  dst.fc2_bias[...] = t


def fold_batchnorm(model: ConvFirstNet, *, block_impl: str | None | object = ...,
                   dtype=None) -> ConvFirstNet:
  """The inference form of a (trained) ConvFirstNet: BatchNorm running statistics folded
  into the preceding conv or matmul, so each block is conv + bias, matmul + bias.

  Eval-mode outputs of the result equal ``model.eval()``'s (to float32 rounding).  The
  input model is not modified.  ``block_impl`` / ``dtype`` override the model's.
  """
  if not isinstance(model, ConvFirstNet):
    raise TypeError(f"fold_batchnorm expects a ConvFirstNet, got {type(model).__name__}")
  if model.folded:
    raise ValueError("this ConvFirstNet is already folded")
  cfg = dict(model.config)
  if block_impl is not ...:
    cfg["block_impl"] = block_impl
  if dtype is not None:
    cfg["dtype"] = dtype
  folded = nnx.eval_shape(lambda: ConvFirstNet(**cfg, folded=True, rngs=nnx.Rngs(0)))
  # eval_shape gives abstract arrays; materialise every parameter before writing into it.
  state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nnx.state(folded))
  nnx.update(folded, state)
  _fold_conv_bn(folded.stem.conv, model.stem.conv, model.stem.bn)
  for fstage, stage in zip(folded.stages, model.stages):
    if stage.downsample is not None:
      _fold_conv_bn(fstage.downsample.conv, stage.downsample.conv, stage.downsample.bn)
    for fblock, block in zip(fstage.blocks, stage.blocks):
      _fold_block(fblock, block)
  if model.head is not None:
    nnx.update(folded.head, nnx.state(model.head))
  return folded
