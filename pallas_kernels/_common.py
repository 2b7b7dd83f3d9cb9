"""Shared helpers for the fused-block Pallas kernels (ConvNeXt now; ConvFirst and MBConv
next: a k x k depthwise/grouped conv on a spatial tile with a halo, then two 1x1 matmuls).

Everything here is either plain Python arithmetic on static shapes (tiling decisions) or
jnp code that lowers both through Pallas-Triton and through the CPU interpreter (the
in-kernel helpers: erf/GELU, halo loads)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

# Triton's tensor-core dot needs every dimension >= 16.
MIN_DOT_DIM = 16


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


class ChannelBlocking(NamedTuple):
  """A channel count C split into ``num`` power-of-two blocks of ``block`` channels.

  Triton block shapes must be powers of two.  Padding C=96 to 128 would spend 78% more
  matmul work (both 1x1 convs scale with C_in * C_out), and every ConvNeXt width is
  2^k or 3*2^k or 5*2^k, so instead of padding we split C into equal power-of-two
  blocks (96 = 3 x 32, 768 = 3 x 256, 640 = 5 x 128) and unroll over them.  Only when
  the largest power-of-two divisor is below the dot minimum (C=40 = 5 x 8) do we pad the
  channel count up to a multiple of 16 (40 -> 48 = 3 x 16) with masked loads."""

  block: int
  num: int

  @property
  def padded(self) -> int:
    return self.block * self.num


def channel_blocking(c: int, max_block: int = 128, min_block: int = MIN_DOT_DIM) -> ChannelBlocking:
  block = c & -c  # largest power of two dividing c
  block = min(block, max_block)
  if block < min_block:
    block = min_block
  return ChannelBlocking(block, cdiv(c, block))


def hidden_blocking(hidden: int, chunk: int) -> tuple[int, int]:
  """(chunk, padded hidden): the hidden (expanded) dimension is looped in chunks of a
  power of two; the weights are zero-padded to a whole number of chunks (zero fc1
  columns give GELU(0) = 0 rows that meet zero fc2 rows: no contribution)."""
  chunk = max(MIN_DOT_DIM, min(chunk, next_power_of_2(hidden)))
  divisor = hidden & -hidden
  if divisor >= MIN_DOT_DIM:
    chunk = min(chunk, divisor)  # a chunk that divides hidden: no padding at all
  return chunk, cdiv(hidden, chunk) * chunk


def pad_axis(a: jax.Array, axis: int, size: int) -> jax.Array:
  extra = size - a.shape[axis]
  if extra == 0:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, extra)
  return jnp.pad(a, widths)


class SpatialTiling(NamedTuple):
  """A (tile_h x tile_w) pixel tile (both powers of two), flattened to tile_h*tile_w
  rows of the kernel's (pixels x channels) tensors."""

  tile_h: int
  tile_w: int
  tiles_h: int
  tiles_w: int

  @property
  def pixels(self) -> int:
    return self.tile_h * self.tile_w

  @property
  def per_image(self) -> int:
    return self.tiles_h * self.tiles_w


def spatial_tiling(h: int, w: int, pixels: int, max_tile_w: int = 0) -> SpatialTiling:
  """Tiles of about ``pixels`` pixels: as wide as the image (rounded up to a power of two,
  so whole rows stay contiguous in NHWC memory), then as many rows as fit.  A tile larger
  than the image shrinks to it (rounded up), so tiny images do not waste work on masked
  lanes; the pixel count never drops below the dot minimum of 16 rows.  ``max_tile_w``
  (a power of two, 0 = no limit) gives squarer tiles, which re-read less halo."""
  pixels = next_power_of_2(max(pixels, MIN_DOT_DIM))
  tile_w = min(next_power_of_2(w), pixels)
  if max_tile_w:
    tile_w = min(tile_w, next_power_of_2(max_tile_w))
  tile_h = min(pixels // tile_w, next_power_of_2(h))
  while tile_h * tile_w < MIN_DOT_DIM:
    tile_h *= 2
  return SpatialTiling(tile_h, tile_w, cdiv(h, tile_h), cdiv(w, tile_w))


# ---------------------------------------------------------------------------------------
# In-kernel math.  Triton has no erf lowering in jax 0.11.2 (only erf_inv), so exact GELU
# uses a rational approximation: erf(x) = x * P(x^2) / Q(x^2) on x clamped to [-4, 4]
# (beyond which erf is +-1 in float32); the same minimax form XLA/Eigen use for float32,
# accurate to a few ulp.  Tested against lax.erf in the kernel tests.
_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
              -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
              -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
             -7.37332916720468e-03, -1.42647390514189e-02)
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def fma(a: jax.Array, b: jax.Array, c: jax.Array, *, fused: bool) -> jax.Array:
  """a * b + c in float32 (all three of one shape).  ``fused=True`` (a compiled GPU kernel)
  emits one ``fma.rn.f32`` per element through inline PTX: Pallas-Triton lowers ``*`` and
  ``+`` to separate round-to-nearest multiplies and adds that ptxas does not contract, so a
  multiply-add loop otherwise issues two instructions per multiply-add (the depthwise conv,
  H100 2026-11-26, ncu: 37% FMUL + 37% FADD of all executed instructions, issue slots 79%
  busy).  ``fused=False`` (the CPU interpreter, which has no PTX) is the plain expression;
  it differs from the fused form only in the rounding of each product."""
  if any(v.dtype != jnp.float32 for v in (a, b, c)) or not a.shape == b.shape == c.shape:
    raise ValueError("fma takes three float32 arrays of one shape, got "
                     f"{[(v.dtype.name, v.shape) for v in (a, b, c)]}")
  if not fused:
    return a * b + c
  [out] = plgpu.elementwise_inline_asm(
      "fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=f,f,f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
  return out


def sigmoid(x: jax.Array, *, fast: bool) -> jax.Array:
  """1 / (1 + exp(-x)) of a float32 array.  ``fast=True`` (a compiled GPU kernel): two
  MUFU instructions through inline PTX, ``ex2.approx`` of -x log2(e) and ``rcp.approx`` of
  1 + that (relative error ~1e-6 over |x| < 20; saturates to 0 and 1), where
  Pallas-Triton's lowering of ``lax.logistic`` calls libdevice's accurate ``expf`` and an
  IEEE division -- about twenty instructions per element, which made the BatchNorm+SiLU
  backward's sums kernel compute-bound (batchnorm.py).  ``fast=False`` (the interpreter,
  which has no PTX, and XLA code): ``jax.nn.sigmoid``."""
  if x.dtype != jnp.float32:
    raise ValueError(f"sigmoid takes a float32 array, got {x.dtype.name}")
  if not fast:
    return jax.nn.sigmoid(x)
  [out] = plgpu.elementwise_inline_asm(
      "{ .reg .f32 t; mul.f32 t, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; "
      "add.f32 t, t, 0f3F800000; rcp.approx.ftz.f32 $0, t; }",
      args=[x], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
  return out


def erf_f32(x: jax.Array) -> jax.Array:
  x = jnp.clip(x, -4.0, 4.0)
  x2 = x * x
  p = jnp.full_like(x, _ERF_ALPHA[0])
  for a in _ERF_ALPHA[1:]:
    p = p * x2 + a
  q = jnp.full_like(x, _ERF_BETA[0])
  for b in _ERF_BETA[1:]:
    q = q * x2 + b
  return x * p / q


def gelu_exact(x: jax.Array) -> jax.Array:
  return 0.5 * x * (1.0 + erf_f32(x * _SQRT_HALF))


def gelu_exact_and_grad(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(gelu(x), d gelu / dx) sharing one erf."""
  cdf = 0.5 * (1.0 + erf_f32(x * _SQRT_HALF))
  return x * cdf, cdf + x * jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _channel_index(c0, width: int, c: int, clamp_to):
  """Channel indices of block [c0, c0+width) and their mask (None when the whole block
  is inside C).  Full blocks use the bare arange so that Triton's axis analysis sees
  contiguous, aligned offsets and emits 16-byte vector loads/stores; any min/where on the
  channel axis would hide that and fall back to 2-byte accesses."""
  ch = c0 + jnp.arange(width, dtype=jnp.int32)
  # c0 is a Python int, or a traced multiple of width when c % width == 0 (always full).
  if not isinstance(c0, int) or c0 + width <= c:
    return ch, None
  inside = ch < c
  return jnp.where(inside, ch, clamp_to), inside


def load_nhwc_tap(ref, n, ih, iw, valid, c0: int, width: int, h: int, w: int, c: int):
  """Masked gather of a (pixels x width) tile of channels [c0, c0+width) from a flat
  NHWC ref: pixel i reads image n at (ih[i], iw[i]); pixels outside the image or with
  valid=False and channels >= c read 0 (the conv's zero padding).  Offsets of masked
  lanes are clamped in range so the CPU interpreter's gather stays in bounds too."""
  ok = valid & (ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)
  pix = jnp.where(ok, (n * h + ih) * w + iw, 0)
  ch, inside = _channel_index(c0, width, c, c - 1)
  mask = ok[:, None] if inside is None else ok[:, None] & inside[None, :]
  return plgpu.load(ref.at[pix[:, None] * c + ch[None, :]], mask=mask, other=0)


def store_nhwc(ref, val, n, ih, iw, valid, c0: int, width: int, h: int, w: int, c: int):
  """Masked scatter of a (pixels x width) tile into a flat NHWC ref.  Masked lanes point
  past the end of the array: the GPU never touches them (mask), and the CPU
  interpreter's scatter drops out-of-bounds updates, whereas clamped offsets would alias
  real elements and race with their writes."""
  size = ref.shape[0]
  ok = valid & (ih < h) & (iw < w)
  pix = jnp.where(ok, (n * h + ih) * w + iw, size // c + 1)
  ch, inside = _channel_index(c0, width, c, size)
  mask = ok[:, None] if inside is None else ok[:, None] & inside[None, :]
  plgpu.store(ref.at[pix[:, None] * c + ch[None, :]], val.astype(ref.dtype), mask=mask)


def load_rows(ref, rows, valid, c0: int, width: int, c: int):
  """Masked load of channels [c0, c0+width) of flat (rows x c) ref rows."""
  pix = jnp.where(valid, rows, 0)
  ch, inside = _channel_index(c0, width, c, c - 1)
  mask = valid[:, None] if inside is None else valid[:, None] & inside[None, :]
  return plgpu.load(ref.at[pix[:, None] * c + ch[None, :]], mask=mask, other=0)


def check_flat_size(*shapes) -> None:
  """Kernels index flat arrays with int32 offsets."""
  for s in shapes:
    if math.prod(s) >= 2**31:
      raise NotImplementedError(f"tensor of shape {s} has >= 2^31 elements (int32 offsets)")
