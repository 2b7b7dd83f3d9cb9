"""Group-width-8 k x k convolution for training: Pallas forward, input- and weight-gradient
kernels under ``jax.custom_vjp``.

ConvFirstNet trains with BatchNorm batch statistics between its convs, so in training the
block cannot be fused into one launch the way the folded inference block is; what Pallas can
take over is the one layer XLA handles worst, the grouped convolution (group width 8: each
output channel reads 8 input channels over k x k taps).  BatchNorm, the 1x1 convs and SiLU
stay in XLA.

Three kernels, one per product of the layer's backward:

* forward ``y = gconv(x, w)``: the pixel-row tiling of ``pallas_triton`` (a k x k tap is a
  masked gather of whole channel rows, "same" padding, any N/H/W), one program per
  (pixel tile, channel tile); per tap one (pixels x Ct) @ (Ct x Ct) block-diagonal dot on the
  tensor cores, float32 accumulation.
* input gradient ``dx = gconv(dy, w')``: the same kernel with the transposed weights -- taps
  mirrored (the transpose of a "same" stride-1 conv is a "same" conv with the flipped
  kernel) and, within each group of 8, inputs and outputs swapped.
* weight gradient ``dw[t, i, g*8+o] = sum_p x[p + off_t, g*8+i] * dy[p, g*8+o]``: a reduction
  over all N*H*W pixels.  One program per (channel tile, pixel split) walks its share of the
  pixel tiles and keeps the k*k (Ct x Ct) float32 partial products in registers (x_tap^T @ dy
  per tap on the tensor cores); each program writes its k*k partial tiles once and XLA sums
  the few splits and keeps the block diagonals.  No atomics, so the result is deterministic.

Weights are the flax ``nnx.Conv`` layout ``(k, k, 8, C)`` (HWIO with I = group width).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _sharding
from pallas_kernels.convfirst_block.common import (
    num_tiles,
    pallas_gpu_unsupported_reason,
)
from pallas_kernels.convfirst_block.pallas_triton import (
    _load_rows,
    _pixels,
    _store_rows,
    _tap_rows,
    _taps,
    block_diagonal_conv_weight,
)
from pallas_kernels.convfirst_block.reference import GROUP_WIDTH
from pallas_kernels.convfirst_block.reference import grouped_conv as grouped_conv_reference

IMPLEMENTATIONS = ("xla", "pallas")
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class GroupedConvConfig:
  """Tiles of the three kernels.

  block_pixels: pixel rows per program (forward / input gradient) and per step of the
    weight-gradient loop; a power of two.
  conv_tile: channels per block-diagonal tile of the forward / input gradient (16 or 32).
  wgrad_tile: channels per tile of the weight gradient; its k*k (tile x tile) float32
    partials live in registers, so 16 for k = 5.
  wgrad_programs: target number of weight-gradient programs (channel tiles x pixel splits).
  """

  block_pixels: int = 128
  conv_tile: int = 32
  wgrad_tile: int = 32
  wgrad_pixels: int = 64
  wgrad_programs: int = 528
  num_warps: int = 4
  wgrad_warps: int = 4


def default_config(channels: int, kernel_size: int) -> GroupedConvConfig:
  del channels
  if kernel_size >= 5:
    return GroupedConvConfig(wgrad_tile=16)
  return GroupedConvConfig()


# ----------------------------------------------------------------------------- weights


def transpose_kernel(kernel: jax.Array) -> jax.Array:
  """The (k, k, 8, C) weights of the input-gradient conv: taps mirrored, and within every
  group of 8 the input and output channels swapped."""
  k, _, gw, c = kernel.shape
  w = kernel.reshape(k, k, gw, c // gw, gw)          # (ky, kx, i, g, o)
  w = jnp.transpose(w, (0, 1, 4, 3, 2))              # (ky, kx, o, g, i)
  return w[::-1, ::-1].reshape(k, k, gw, c)


def block_diagonal_to_kernel(dense: jax.Array, kernel_size: int, channels: int) -> jax.Array:
  """(k*k, Cp, tile) block-diagonal weight tiles -> (k, k, 8, channels) (inverse of
  ``block_diagonal_conv_weight``: keeps the diagonal 8x8 blocks)."""
  kk, cp, tile = dense.shape
  g = tile // GROUP_WIDTH
  d = dense.reshape(kk, cp // tile, g, GROUP_WIDTH, g, GROUP_WIDTH)  # (t, j, a, i, b, o)
  d = jnp.diagonal(d, axis1=2, axis2=4)                              # (t, j, i, o, a)
  d = jnp.transpose(d, (0, 2, 1, 4, 3))                              # (t, i, j, a, o)
  return d.reshape(kernel_size, kernel_size, GROUP_WIDTH, cp)[..., :channels]


# ----------------------------------------------------------------------------- kernels


def _conv_kernel(x_ref, w_ref, y_ref, *, height, width, channels, kernel_size, block_pixels,
                 tile):
  j = pl.program_id(1)
  q, inside, qc = _pixels(block_pixels, x_ref.shape[0])
  acc = jnp.zeros((block_pixels, tile), jnp.float32)
  for t, dy, dx in _taps(kernel_size):
    rows, valid = _tap_rows(qc, inside, dy=dy, dx=dx, height=height, width=width)
    xs = _load_rows(x_ref, rows, valid, j * tile, tile, channels)
    acc += jnp.dot(xs, w_ref[t, pl.ds(j * tile, tile), :], preferred_element_type=jnp.float32)
  _store_rows(y_ref, q, inside, j * tile, acc, channels)


def _wgrad_kernel(x_ref, dy_ref, dw_ref, *, height, width, channels, kernel_size,
                  block_pixels, tile, blocks_per_program):
  j, s = pl.program_id(0), pl.program_id(1)
  num_pixels = x_ref.shape[0]
  taps = _taps(kernel_size)
  iota = jax.lax.broadcasted_iota(jnp.int32, (block_pixels,), 0)

  def step(b, accs):
    q = (s * blocks_per_program + b) * block_pixels + iota
    inside = q < num_pixels
    qc = jnp.where(inside, q, 0)
    g = _load_rows(dy_ref, qc, inside, j * tile, tile, channels)
    out = []
    for (t, dy, dx), acc in zip(taps, accs):
      rows, valid = _tap_rows(qc, inside, dy=dy, dx=dx, height=height, width=width)
      xs = _load_rows(x_ref, rows, valid, j * tile, tile, channels)
      out.append(acc + jax.lax.dot_general(xs, g, (((0,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32))
    return tuple(out)

  accs = tuple(jnp.zeros((tile, tile), jnp.float32) for _ in taps)
  accs = jax.lax.fori_loop(0, blocks_per_program, step, accs)
  for (t, _, _), acc in zip(taps, accs):
    dw_ref[s, t, pl.ds(j * tile, tile), :] = acc


# ----------------------------------------------------------------------------- launchers


def _conv(x, kernel, cfg: GroupedConvConfig, interpret: bool, name: str):
  n, h, w, c = x.shape
  k = kernel.shape[0]
  tile = cfg.conv_tile
  cp = num_tiles(c, tile) * tile
  wd = block_diagonal_conv_weight(kernel, tile, cp, x.dtype)
  x2 = x.reshape(n * h * w, c)
  body = functools.partial(_conv_kernel, height=h, width=w, channels=c, kernel_size=k,
                           block_pixels=cfg.block_pixels, tile=tile)
  y = pl.pallas_call(
      body,
      grid=(pl.cdiv(n * h * w, cfg.block_pixels), cp // tile),
      out_shape=jax.ShapeDtypeStruct(x2.shape, x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
      interpret=interpret, name=name,
  )(x2, wd)
  return y.reshape(x.shape)


def _wgrad(x, dy, kernel_size, cfg: GroupedConvConfig, interpret: bool):
  n, h, w, c = x.shape
  tile = cfg.wgrad_tile
  cp = num_tiles(c, tile) * tile
  m = n * h * w
  blocks = pl.cdiv(m, cfg.wgrad_pixels)
  splits = max(1, min(blocks, cfg.wgrad_programs // (cp // tile)))
  per = pl.cdiv(blocks, splits)
  splits = pl.cdiv(blocks, per)
  body = functools.partial(_wgrad_kernel, height=h, width=w, channels=c,
                           kernel_size=kernel_size, block_pixels=cfg.wgrad_pixels, tile=tile,
                           blocks_per_program=per)
  kk = kernel_size * kernel_size
  partial = pl.pallas_call(
      body,
      grid=(cp // tile, splits),
      out_shape=jax.ShapeDtypeStruct((splits, kk, cp, tile), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=cfg.wgrad_warps, num_stages=1),
      interpret=interpret, name="grouped_conv_wgrad",
  )(x.reshape(m, c), dy.reshape(m, c))
  return block_diagonal_to_kernel(partial.sum(0), kernel_size, c)


def check_supported(x: jax.Array, kernel: jax.Array) -> None:
  if x.dtype not in SUPPORTED_DTYPES:
    raise NotImplementedError(
        f"Pallas grouped_conv: dtype {x.dtype} is not supported (float32, bfloat16)")
  if kernel.shape[0] % 2 == 0:
    raise NotImplementedError(f"Pallas grouped_conv: even kernel size {kernel.shape[0]}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _grouped_conv_pallas(x, kernel, cfg, interpret):
  return _conv(x, kernel.astype(x.dtype), cfg, interpret, "grouped_conv_fwd")


def _fwd(x, kernel, cfg, interpret):
  return _grouped_conv_pallas(x, kernel, cfg, interpret), (x, kernel)


def _bwd(cfg, interpret, res, dy):
  x, kernel = res
  dy = dy.astype(x.dtype)
  dx = _conv(dy, transpose_kernel(kernel).astype(x.dtype), cfg, interpret, "grouped_conv_dgrad")
  dw = _wgrad(x, dy, kernel.shape[0], cfg, interpret)
  return dx, dw.astype(kernel.dtype)


_grouped_conv_pallas.defvjp(_fwd, _bwd)


def _check(x, kernel):
  if x.ndim != 4:
    raise ValueError(f"grouped_conv expects NHWC input of rank 4, got shape {x.shape}")
  c = x.shape[-1]
  if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != GROUP_WIDTH \
      or kernel.shape[3] != c:
    raise ValueError(f"grouped_conv: kernel must be (k, k, {GROUP_WIDTH}, {c}) for input "
                     f"{x.shape}, got {kernel.shape}")


def grouped_conv(x: jax.Array, kernel: jax.Array, *, implementation: str | None = None,
                 config: GroupedConvConfig | None = None,
                 interpret: bool = False) -> jax.Array:
  """"Same" stride-1 group-width-8 conv of NHWC ``x`` with ``kernel`` (k, k, 8, C), output
  in ``x.dtype`` (float32 accumulation).  Differentiable in both arguments.

  implementation: "xla" (``lax.conv_general_dilated``), "pallas" (the kernels above; raises
  NotImplementedError naming what is unsupported), or None: XLA.  None does not pick Pallas
  because on an H100 XLA's grouped conv was faster for forward + backward at every
  ConvFirstNet training shape measured (2026-11-24, bfloat16, batch 128: Pallas 0.50x-0.72x,
  limited by the weight-gradient reduction; see benchmarks/RESULTS.md), so Pallas is opt-in.
  interpret: run the Pallas kernels in the interpreter (CPU tests); only with "pallas".
  config: tile sizes (``GroupedConvConfig``); default ``default_config(C, k)``.
  """
  _check(x, kernel)
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(
        f"implementation must be one of None, {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation != "pallas":
    return grouped_conv_reference(x, kernel)
  reason = pallas_gpu_unsupported_reason(interpret)
  if reason is None:
    try:
      check_supported(x, kernel)
    except NotImplementedError as e:
      reason = str(e)
  if reason is not None:
    raise NotImplementedError(reason if reason.startswith("Pallas")
                              else f"Pallas grouped_conv: {reason}")
  cfg = config or default_config(x.shape[-1], kernel.shape[0])
  return _sharding.map_batch(lambda x, k: _grouped_conv_pallas(x, k, cfg, interpret),
                             (x,), (kernel,), batch=x.shape[0])
