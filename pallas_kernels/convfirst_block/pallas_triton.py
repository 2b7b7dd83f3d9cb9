"""Fused inference ConvFirst and MBConv blocks: one Triton-lowered Pallas launch per block.

Layout.  x (N, H, W, C) is viewed as a pixel matrix (M = N*H*W, C) and each program owns
``block_pixels`` consecutive pixels (rows).  A k x k tap (dy, dx) of pixel q reads row
q + (dy-p)*W + (dx-p) when that pixel lies inside the same image, else zero ("same" padding),
so every tap is one masked 2-D gather of whole channel rows: odd H, W, images smaller than the
tile and any batch need no padded copy of x.  The shifted rows of neighbouring taps overlap and
are served by L1/L2; DRAM sees x about once.

Grouped conv on tensor cores.  A group-width-8 conv is 8-wide dot products, far too small for
an MMA.  Per tap and per channel tile of Ct channels (Ct >= 16, the smallest K/N a Triton dot
accepts) the kernel multiplies the (pixels x Ct) input tile by a dense (Ct x Ct)
block-diagonal matrix whose diagonal holds Ct/8 of the 8x8 group weights and zeros elsewhere.
That wastes Ct/8 of the conv's multiply-adds but runs them on the tensor cores at a rate far
above the FMA units' (an 8-wide scalar loop would be the slowest part of the block), and the
conv is the smallest term of the block either way.  Accumulation is float32.

Hidden chunks.  The E*C intermediate never leaves the chip: the kernel loops over hidden
chunks of ``hidden_chunk`` channels as flash attention loops over keys; each chunk's expand
output is activated and immediately multiplied into the float32 (pixels x C) output
accumulator.

MBConv halo.  The MBConv conv runs on the expanded tensor.  Triton has no addressable shared
memory to shift an on-chip tile by a tap, so for every tap the kernel recomputes the chunk's
expand for the shifted pixels (re-reading x rows from L1/L2) instead of writing the expanded
tensor to DRAM: k*k times the expand multiply-adds, traded for no intermediate traffic.

Dtypes.  Dot operands are in x.dtype (bfloat16 -> tensor cores; float32 -> exact IEEE dots),
accumulation, biases and activations in float32; dot inputs are rounded to x.dtype where the
reference stores its intermediates in x.dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.convfirst_block.common import channel_tile, next_power_of_2, num_tiles
from pallas_kernels.convfirst_block.reference import (
    GROUP_WIDTH,
    ConvFirstBlockParams,
    MBConvBlockParams,
)

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Launch parameters of one fused block kernel (shared by the tuner and the logs).

  block_pixels: pixels (rows of the N*H*W x C matrix) per program, a power of two.
  conv_tile: channels per block-diagonal conv tile (16, 32 or 64).  In MBConv the conv runs on the
    expanded tensor, so this is also the hidden chunk.
  hidden_chunk: hidden channels per step of the fc1 -> SiLU -> fc2 loop (ConvFirst only).
  halo_scratch: MBConv only.  False: recompute the expand of the chunk for every tap (k*k
    times the expand work).  True: compute it once for the tile and its halo rows, park it in
    a per-program (rows x conv_tile) slot of a small global scratch buffer (L2-resident,
    reused for every chunk, so it is G*rows*conv_tile elements, not the E*C tensor), and read
    the taps back from there, with a CTA barrier between the writes and the reads.
  """

  block_pixels: int = 64
  conv_tile: int = 16
  hidden_chunk: int = 64
  num_warps: int = 4
  num_stages: int = 1
  halo_scratch: bool = False


def default_config(kind: str, channels: int, hidden: int) -> BlockConfig:
  # Chosen on an H100 (benchmarks/blocks_convfirst.py): the float32 output accumulator is
  # (block_pixels x C), so the tile shrinks as C grows to stay in registers.
  if kind == "convfirst":
    pixels = 128 if channels <= 64 else 64
    chunk = 64 if hidden % 64 == 0 else 32
    return BlockConfig(block_pixels=pixels, conv_tile=32, hidden_chunk=chunk, num_warps=4)
  if channels <= 256:
    # MBConv 14x14x256 E4, batch 128, bf16 (H100, 2026-11-24 and -25): 0.57 ms with the
    # expand computed once per tile + halo (halo_scratch) in 64-channel chunks, vs 1.11 ms
    # recomputing it per tap (P64 ct32), 0.64 ms for P64 ct32 + scratch.  (Still 0.45x
    # XLA, so implementation=None keeps XLA for MBConv.)
    return BlockConfig(block_pixels=128, conv_tile=64, num_warps=8, halo_scratch=True)
  # Wider blocks (the (pixels x C) float32 accumulator limits the tile): MBConv 14x14x384 and
  # 7x7x768 E4 (H100, 2026-11-25): 1.21 / 1.47 ms with P64 ct64 scratch vs 3.50 / 4.81 ms
  # for P32 ct32 without (XLA 0.38 / 0.24 ms).
  return BlockConfig(block_pixels=64, conv_tile=64, num_warps=8, halo_scratch=True)


# ----------------------------------------------------------------------------- weights


def _pad_to(a: jax.Array, shape) -> jax.Array:
  return jnp.pad(a, [(0, s - d) for s, d in zip(shape, a.shape)])


def block_diagonal_conv_weight(kernel: jax.Array, tile: int, padded_channels: int,
                               dtype) -> jax.Array:
  """(k, k, 8, C) group-width-8 weights -> (k*k, padded_channels, tile) dense tiles.

  Row r of the result is input channel r; column o of rows [j*tile, (j+1)*tile) is output
  channel j*tile + o.  Entries joining channels of different groups are zero.
  """
  k, _, gw, c = kernel.shape
  groups_per_tile = tile // gw
  padded = _pad_to(kernel, (k, k, gw, padded_channels))
  # w[t, j, a, i, o]: tap t, tile j, group a within the tile, input i, output o (within group).
  w = padded.reshape(k * k, gw, padded_channels // tile, groups_per_tile, gw)
  w = jnp.transpose(w, (0, 2, 3, 1, 4))
  eye = jnp.eye(groups_per_tile, dtype=w.dtype)
  # dense[t, j, a, i, b, o] = w[t, j, a, i, o] * (a == b)
  dense = w[:, :, :, :, None, :] * eye[None, None, :, None, :, None]
  return dense.reshape(k * k, padded_channels, tile).astype(dtype)


# ----------------------------------------------------------------------------- kernel pieces


def _iota(n):
  return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def _pixels(block_pixels, num_pixels):
  q = pl.program_id(0) * block_pixels + _iota(block_pixels)
  inside = q < num_pixels
  return q, inside, jnp.where(inside, q, 0)


def _tap_rows(q_clamped, inside, *, dy, dx, height, width):
  """Source row of tap (dy, dx) (offsets from the centre) and whether it is in the image."""
  rem = q_clamped % (height * width)
  h, w = rem // width, rem % width
  valid = inside & (h + dy >= 0) & (h + dy < height) & (w + dx >= 0) & (w + dx < width)
  return jnp.where(valid, q_clamped + dy * width + dx, 0), valid


def _load_rows(ref, rows, valid, col0, width, channels):
  cols = col0 + _iota(width)
  mask = valid[:, None] & (cols < channels)[None, :]
  return plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=0.0)


def _store_rows(ref, rows, valid, col0, value, channels):
  cols = col0 + _iota(value.shape[1])
  mask = valid[:, None] & (cols < channels)[None, :]
  # Out-of-range rows/cols stay unclamped (and masked) so that no two lanes alias one element.
  plgpu.store(ref.at[rows[:, None], cols[None, :]], value.astype(ref.dtype), mask=mask)


def _tap_offsets(t, kernel_size, pad):
  """(dy, dx) of loop tap t.  lax.div / lax.rem rather than // and %: t >= 0, and jnp's
  floor-division and modulo add sign fix-ups (a select on a bool) that the Triton lowering
  rejects for a loop-carried scalar ("AssertionError: ('i32', 'i1')" on the H100)."""
  return (jax.lax.div(t, kernel_size) - pad, jax.lax.rem(t, kernel_size) - pad)


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _taps(k):
  p = (k - 1) // 2
  return [(t, dy - p, dx - p) for t, (dy, dx) in enumerate(np.ndindex(k, k))]


def _convfirst_kernel(x_ref, wc_ref, bc_ref, w1_ref, b1_ref, w2_ref, b2_ref, y_ref, *,
                      height, width, channels, kernel_size, cfg: BlockConfig, io_tile,
                      num_chunks):
  dtype = x_ref.dtype
  ct, hc = cfg.conv_tile, cfg.hidden_chunk
  q, inside, qc = _pixels(cfg.block_pixels, x_ref.shape[0])
  taps = [(t, *_tap_rows(qc, inside, dy=dy, dx=dx, height=height, width=width))
          for t, dy, dx in _taps(kernel_size)]
  # Grouped conv + bias, one block-diagonal dot per (channel tile, tap).
  z = []
  for j in range(num_tiles(channels, ct)):
    acc = jnp.zeros((cfg.block_pixels, ct), jnp.float32)
    for t, rows, valid in taps:
      xs = _load_rows(x_ref, rows, valid, j * ct, ct, channels)
      acc += _dot(xs, wc_ref[t, pl.ds(j * ct, ct), :])
    z.append((acc + bc_ref[pl.ds(j * ct, ct)][None, :]).astype(dtype))

  n_out = num_tiles(channels, io_tile)

  def chunk(c, ys):
    cols = pl.ds(c * hc, hc)
    h = b1_ref[cols][None, :] + sum(_dot(zj, w1_ref[pl.ds(j * ct, ct), cols])
                                    for j, zj in enumerate(z))
    h = jax.nn.silu(h).astype(dtype)
    return tuple(y + _dot(h, w2_ref[cols, pl.ds(o * io_tile, io_tile)])
                 for o, y in enumerate(ys))

  ys = tuple(jnp.zeros((cfg.block_pixels, io_tile), jnp.float32) for _ in range(n_out))
  ys = jax.lax.fori_loop(0, num_chunks, chunk, ys)
  for o, y in enumerate(ys):
    res = _load_rows(x_ref, qc, inside, o * io_tile, io_tile, channels).astype(jnp.float32)
    y = y + b2_ref[pl.ds(o * io_tile, io_tile)][None, :] + res
    _store_rows(y_ref, q, inside, o * io_tile, y, channels)


def _mbconv_kernel(x_ref, w1_ref, b1_ref, wc_ref, bc_ref, w2_ref, b2_ref, y_ref, *,
                   height, width, channels, kernel_size, cfg: BlockConfig, io_tile,
                   num_chunks):
  dtype = x_ref.dtype
  hc = cfg.conv_tile
  n_io = num_tiles(channels, io_tile)
  q, inside, qc = _pixels(cfg.block_pixels, x_ref.shape[0])
  pad = (kernel_size - 1) // 2

  def chunk(c, ys):
    cols = pl.ds(c * hc, hc)
    b1 = b1_ref[cols][None, :]

    # Taps in a loop, not unrolled: unrolled, Triton keeps every tap's dot operands live in
    # shared memory at once (over 228 KB for C >= 128).
    def tap(t, acc):
      dy, dx = _tap_offsets(t, kernel_size, pad)
      rows, valid = _tap_rows(qc, inside, dy=dy, dx=dx, height=height, width=width)
      # The expand of this chunk at the tap's source pixels, recomputed on chip.
      h = b1 + sum(_dot(_load_rows(x_ref, rows, valid, i * io_tile, io_tile, channels),
                        w1_ref[pl.ds(i * io_tile, io_tile), cols]) for i in range(n_io))
      # "same" padding pads the *expanded* tensor with zeros, not silu(b1).
      h = jnp.where(valid[:, None], jax.nn.silu(h), 0.0).astype(dtype)
      return acc + _dot(h, wc_ref[t, cols, :])

    acc = jax.lax.fori_loop(0, kernel_size * kernel_size, tap,
                            jnp.zeros((cfg.block_pixels, hc), jnp.float32))
    g = jax.nn.silu(acc + bc_ref[cols][None, :]).astype(dtype)
    return tuple(y + _dot(g, w2_ref[cols, pl.ds(o * io_tile, io_tile)])
                 for o, y in enumerate(ys))

  ys = tuple(jnp.zeros((cfg.block_pixels, io_tile), jnp.float32) for _ in range(n_io))
  ys = jax.lax.fori_loop(0, num_chunks, chunk, ys)
  for o, y in enumerate(ys):
    res = _load_rows(x_ref, qc, inside, o * io_tile, io_tile, channels).astype(jnp.float32)
    y = y + b2_ref[pl.ds(o * io_tile, io_tile)][None, :] + res
    _store_rows(y_ref, q, inside, o * io_tile, y, channels)


def _mbconv_scratch_kernel(x_ref, w1_ref, b1_ref, wc_ref, bc_ref, w2_ref, b2_ref, y_ref,
                           s_ref, *, height, width, channels, kernel_size, cfg: BlockConfig,
                           io_tile, num_chunks, barrier):
  dtype = x_ref.dtype
  hc, bp = cfg.conv_tile, cfg.block_pixels
  n_io = num_tiles(channels, io_tile)
  num_pixels = x_ref.shape[0]
  q, inside, qc = _pixels(bp, num_pixels)
  band = halo_band(kernel_size, width)
  slot_rows = bp + 2 * band
  slot0 = pl.program_id(0) * slot_rows
  q0 = pl.program_id(0) * bp
  # Halo pieces: `band` rows before the tile, the tile, `band` rows after.
  pieces = [(q0 - band, band, 0), (q0, bp, band), (q0 + bp, band, band + bp)]
  pad = (kernel_size - 1) // 2
  cols_hc = _iota(hc)

  def chunk(c, ys):
    cols = pl.ds(c * hc, hc)
    b1 = b1_ref[cols][None, :]
    for start, rows, offset in pieces:
      src = start + _iota(rows)
      ok = (src >= 0) & (src < num_pixels)
      h = b1 + sum(_dot(_load_rows(x_ref, jnp.where(ok, src, 0), ok, i * io_tile, io_tile,
                                   channels),
                        w1_ref[pl.ds(i * io_tile, io_tile), cols]) for i in range(n_io))
      srow = slot0 + offset + _iota(rows)
      plgpu.store(s_ref.at[srow[:, None], cols_hc[None, :]], jax.nn.silu(h).astype(dtype))
    barrier()   # every thread's expand rows are written before any tap reads
    def tap(t, acc):
      dy, dx = _tap_offsets(t, kernel_size, pad)
      _, valid = _tap_rows(qc, inside, dy=dy, dx=dx, height=height, width=width)
      srow = slot0 + band + dy * width + dx + _iota(bp)
      hs = plgpu.load(s_ref.at[srow[:, None], cols_hc[None, :]], mask=valid[:, None],
                      # volatile, not cache_modifier=".cg": jax 0.11.2's Triton lowering
                      # accepts ".cg" but then fails to look it up (KeyError '.cg').
                      other=0.0, volatile=True)
      return acc + _dot(hs, wc_ref[t, cols, :])

    acc = jax.lax.fori_loop(0, kernel_size * kernel_size, tap,
                            jnp.zeros((bp, hc), jnp.float32))
    barrier()   # all taps are read before the next chunk overwrites the slot
    g = jax.nn.silu(acc + bc_ref[cols][None, :]).astype(dtype)
    return tuple(y + _dot(g, w2_ref[cols, pl.ds(o * io_tile, io_tile)])
                 for o, y in enumerate(ys))

  ys = tuple(jnp.zeros((bp, io_tile), jnp.float32) for _ in range(n_io))
  ys = jax.lax.fori_loop(0, num_chunks, chunk, ys)
  for o, y in enumerate(ys):
    res = _load_rows(x_ref, qc, inside, o * io_tile, io_tile, channels).astype(jnp.float32)
    y = y + b2_ref[pl.ds(o * io_tile, io_tile)][None, :] + res
    _store_rows(y_ref, q, inside, o * io_tile, y, channels)


def halo_band(kernel_size: int, width: int) -> int:
  """Rows of halo each side of a pixel-row tile: a power of two >= p*W + p."""
  p = (kernel_size - 1) // 2
  return next_power_of_2(max(p * width + p, 1))


# ----------------------------------------------------------------------------- launchers


def check_supported(x: jax.Array, kernel_size: int, name: str) -> None:
  """Raise NotImplementedError naming what the fused kernel does not cover."""
  if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
    raise NotImplementedError(
        f"fused Pallas {name}: dtype {x.dtype} is not supported (float32, bfloat16)")
  if kernel_size % 2 == 0:
    raise NotImplementedError(f"fused Pallas {name}: even kernel size {kernel_size}")


def _launch(kernel, x, weights, *, cfg, name, interpret, output_init, scratch_rows=0,
            scratch_cols=0, **static):
  n, h, w, c = x.shape
  num_pixels = n * h * w
  x2 = x.reshape(num_pixels, c)
  body = functools.partial(kernel, height=h, width=w, channels=c, cfg=cfg, **static)
  args = (x2, *weights)
  aliases = {}
  if output_init is not None:
    # The kernel writes into this buffer in place: a caller that fills it with NaN sees
    # every element the kernel failed to write.
    if output_init.shape != x.shape or output_init.dtype != x.dtype:
      raise ValueError(f"output_init must be {x.shape} {x.dtype}, got "
                       f"{output_init.shape} {output_init.dtype}")
    aliases = {len(args): 0}
    args = (*args, output_init.reshape(x2.shape))
    body = _ignore_aliased_input(body, len(args))
  grid = pl.cdiv(num_pixels, cfg.block_pixels)
  out_shape = [jax.ShapeDtypeStruct(x2.shape, x.dtype)]
  if scratch_rows:
    out_shape.append(jax.ShapeDtypeStruct((grid * scratch_rows, scratch_cols), x.dtype))
  out = pl.pallas_call(
      body,
      grid=(grid,),
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
      interpret=interpret,
      name=name,
  )(*args)[0]
  return out.reshape(x.shape)


def _ignore_aliased_input(kernel, num_inputs):
  """The kernel without its last input (the buffer aliased to output 0)."""
  def wrapped(*refs):
    return kernel(*refs[:num_inputs - 1], *refs[num_inputs:])
  return wrapped


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def convfirst_block_pallas(x: jax.Array, params: ConvFirstBlockParams, *,
                           output_init: jax.Array | None = None,
                           config: BlockConfig | None = None,
                           interpret: bool = False) -> jax.Array:
  k = params.conv_kernel.shape[0]
  check_supported(x, k, "convfirst_block")
  c, hidden = params.fc1_kernel.shape
  cfg = config or default_config("convfirst", c, hidden)
  dtype = x.dtype
  ct, hc = cfg.conv_tile, cfg.hidden_chunk
  io_tile = channel_tile(c)
  conv_c = num_tiles(c, ct) * ct
  out_c = num_tiles(c, io_tile) * io_tile
  hidden_p = num_tiles(hidden, hc) * hc
  f32 = jnp.float32
  weights = (
      block_diagonal_conv_weight(params.conv_kernel, ct, conv_c, dtype),
      _pad_to(params.conv_bias.astype(f32), (conv_c,)),
      _pad_to(params.fc1_kernel, (conv_c, hidden_p)).astype(dtype),
      _pad_to(params.fc1_bias.astype(f32), (hidden_p,)),
      _pad_to(params.fc2_kernel, (hidden_p, out_c)).astype(dtype),
      _pad_to(params.fc2_bias.astype(f32), (out_c,)),
  )
  return _launch(_convfirst_kernel, x, weights, cfg=cfg, name="convfirst_block_fwd",
                 interpret=interpret, output_init=output_init, kernel_size=k, io_tile=io_tile,
                 num_chunks=hidden_p // hc)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def mbconv_block_pallas(x: jax.Array, params: MBConvBlockParams, *,
                        output_init: jax.Array | None = None,
                        config: BlockConfig | None = None,
                        interpret: bool = False) -> jax.Array:
  k = params.conv_kernel.shape[0]
  check_supported(x, k, "mbconv_block")
  c, hidden = params.fc1_kernel.shape
  cfg = config or default_config("mbconv", c, hidden)
  dtype = x.dtype
  hc = cfg.conv_tile
  io_tile = channel_tile(c)
  in_c = num_tiles(c, io_tile) * io_tile
  hidden_p = num_tiles(hidden, hc) * hc
  f32 = jnp.float32
  weights = (
      _pad_to(params.fc1_kernel, (in_c, hidden_p)).astype(dtype),
      _pad_to(params.fc1_bias.astype(f32), (hidden_p,)),
      block_diagonal_conv_weight(params.conv_kernel, hc, hidden_p, dtype),
      _pad_to(params.conv_bias.astype(f32), (hidden_p,)),
      _pad_to(params.fc2_kernel, (hidden_p, in_c)).astype(dtype),
      _pad_to(params.fc2_bias.astype(f32), (in_c,)),
  )
  scratch = {}
  kernel = _mbconv_kernel
  if cfg.halo_scratch:
    kernel = _mbconv_scratch_kernel
    # Interpret mode runs a program's threads in lock step: no barrier there (nor a lowering).
    scratch = dict(scratch_rows=cfg.block_pixels + 2 * halo_band(k, x.shape[2]),
                   scratch_cols=hc, barrier=(lambda: None) if interpret else plgpu.debug_barrier)
  return _launch(kernel, x, weights, cfg=cfg, name="mbconv_block_fwd",
                 interpret=interpret, output_init=output_init, **scratch, kernel_size=k, io_tile=io_tile,
                 num_chunks=hidden_p // hc)


assert GROUP_WIDTH == 8  # the block-diagonal tiles are built from 8x8 groups
