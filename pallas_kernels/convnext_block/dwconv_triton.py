"""Depthwise k x k "same" convolution (+ bias) as a Pallas-Triton kernel, row by row.

The Mosaic forward (mosaic.py) runs the block's pointwise half in one kernel but leaves the
7x7 depthwise conv to XLA, and that conv was half of the block's time: 0.32 of 0.60 ms at
56x56x96, batch 128, bf16 on an H200 (2026-11-25), about 0.5 TB/s against a DRAM floor of
~0.03 ms for reading x and writing z once.

Each program owns a strip of ``strip`` output rows x ``tile_w`` columns x ``cblock``
channels of one image.  It walks the strip's input rows (the strip plus k//2 rows of halo
above and below) once; for each input row and each of the k horizontal taps it loads one
shifted (tile_w x cblock) slice (zero outside the image, by masking) and adds it, times
the k vertical taps' weights, into the accumulators of the (up to k) output rows that input
row feeds.  An output row is stored (+ bias, in the output dtype) as soon as its last input
row has been added.  So each input element is loaded k times per strip (once per
horizontal shift, mostly L1 hits) instead of k*k times, and accumulation is float32.  The
loops are unrolled in Python, so accumulators of rows outside the strip are never formed.

The transposed conv (the input gradient of a depthwise conv) is the same conv with the
taps mirrored: ``depthwise_conv(dy, kernel[::-1, ::-1])``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common as cm

f32 = jnp.float32


class DwconvTiles(NamedTuple):
  """strip: output rows per program; tile_w: columns (power of two); cblock: channels
  (power of two); num_warps: Triton warps per program."""

  strip: int = 28
  tile_w: int = 0  # 0: the image width rounded up to a power of two, at most 64
  cblock: int = 32
  num_warps: int = 4
  num_stages: int = 1
  prefetch: bool = False  # load input row i + 1 while accumulating row i
  unroll: int = 1         # input rows per iteration of the row loop


def resolve_tiles(h: int, w: int, c: int, tiles: DwconvTiles | None = None) -> DwconvTiles:
  """``tiles`` (default DwconvTiles()) made concrete for an (h, w, c) image: strip at most
  h, tile_w 0 resolved, cblock at most C rounded up to a power of two."""
  t = tiles or DwconvTiles()
  tile_w = t.tile_w or min(cm.next_power_of_2(w), 64)
  cblock = min(t.cblock, cm.next_power_of_2(c))
  for name, v in (("tile_w", tile_w), ("cblock", cblock)):
    if v < 1 or v & (v - 1):
      raise ValueError(f"DwconvTiles.{name} must be a power of two, got {v}")
  if t.strip < 1 or t.unroll < 1:
    raise ValueError(f"DwconvTiles.strip and .unroll must be >= 1, got {t.strip}, {t.unroll}")
  return t._replace(strip=min(t.strip, h), tile_w=tile_w, cblock=cblock)


def _kernel(x_ref, k_ref, b_ref, y_ref, *, h, w, c, k, cpad, strips, tiles: DwconvTiles,
            diag=None):
  pad = k // 2
  strip, tile_w, cblock = tiles.strip, tiles.tile_w, tiles.cblock
  pid = pl.program_id(0)
  n = pid // strips
  r0 = (pid % strips) * strip
  ww = pl.program_id(1) * tile_w + jnp.arange(tile_w, dtype=jnp.int32)
  c0 = pl.program_id(2) * cblock
  ch = c0 + jnp.arange(cblock, dtype=jnp.int32)
  ch_ok = None if c % cblock == 0 else ch < c
  if ch_ok is not None:
    ch = jnp.where(ch_ok, ch, 0)

  def mask_of(pix_ok):
    return pix_ok[:, None] if ch_ok is None else pix_ok[:, None] & ch_ok[None, :]

  def load_row(i, dx):
    iw = ww + (dx - pad)
    ok = (iw >= 0) & (iw < w) & (i >= 0) & (i < h)
    pix = jnp.where(ok, (n * h + i) * w + iw, 0)
    return plgpu.load(x_ref.at[pix[:, None] * c + ch[None, :]], mask=mask_of(ok), other=0)

  def tap(dy, dx):
    if diag == "const_taps":  # timing diagnostic only: no weight loads
      return 0.02 * (dy * k + dx + 1)
    return k_ref[pl.ds((dy * k + dx) * cpad + c0, cblock)][None, :]

  bias = b_ref[pl.ds(c0, cblock)][None, :]
  size = y_ref.shape[0]

  def store_row(o, acc, row_ok):
    ok = row_ok & (o < h) & (ww < w)
    # Masked lanes point past the end: the GPU never touches them, and the CPU
    # interpreter's scatter drops out-of-bounds updates (clamping would alias real rows).
    pix = jnp.where(ok, (n * h + o) * w + ww, size // c + 1)
    plgpu.store(y_ref.at[pix[:, None] * c + ch[None, :]], (acc + bias).astype(y_ref.dtype),
                mask=mask_of(ok))

  # Rolling window: before the step for input row i, accs[j] holds the partial sum of
  # output row i - pad + j (j = 0 .. k-1); input row i feeds it through vertical tap
  # dy = k - 1 - j, after which row i - pad is complete.
  def accumulate(accs, vs):
    accs = list(accs)
    for dx in range(k):
      v = vs[dx].astype(f32)
      for j in range(k):
        accs[j] = accs[j] + v * tap(k - 1 - j, dx)
    return accs

  def finish(i, accs):
    o = i - pad
    store_row(o, accs[0], (o >= r0) & (o < r0 + strip))
    return (*accs[1:], jnp.zeros_like(accs[0]))

  def load_all(i):
    return tuple(load_row(i, dx) for dx in range(k))

  # ``unroll`` input rows per loop iteration (lax.fori_loop's own unroll does not lower
  # through Pallas-Triton); steps past the strip's last row store nothing.
  u = tiles.unroll
  steps = cm.cdiv(strip + 2 * pad, u)

  def body(s, accs):
    for q in range(u):
      i = r0 - pad + s * u + q
      accs = finish(i, accumulate(accs, load_all(i)))
    return accs

  def body_prefetch(s, carry):
    accs, vs = carry
    for q in range(u):
      i = r0 - pad + s * u + q
      nxt = load_all(i + 1)
      accs, vs = finish(i, accumulate(accs, vs)), nxt
    return accs, vs

  zero = jnp.zeros((tile_w, cblock), f32)
  if tiles.prefetch:
    jax.lax.fori_loop(0, steps, body_prefetch, ((zero,) * k, load_all(r0 - pad)))
  else:
    jax.lax.fori_loop(0, steps, body, (zero,) * k)


def unsupported_reason(x_shape, kernel_shape) -> str | None:
  if len(x_shape) != 4:
    return f"expects NHWC input of rank 4, got shape {tuple(x_shape)}"
  c = x_shape[-1]
  if len(kernel_shape) != 3 or kernel_shape[0] != kernel_shape[1] or kernel_shape[2] != c:
    return f"kernel must be (k, k, {c}) for input {tuple(x_shape)}, got {tuple(kernel_shape)}"
  if kernel_shape[0] % 2 == 0:
    return f"even kernel size {kernel_shape[0]} (\"same\" padding needs an odd size)"
  n, h, w, _ = x_shape
  if (n * h * w + 2) * c >= 2**31:
    return f"input of shape {tuple(x_shape)} is too large for int32 offsets"
  return None


@functools.partial(jax.jit, static_argnames=("tiles", "interpret", "_diag"))
def depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
                   tiles: DwconvTiles | None = None, interpret: bool = False,
                   _diag: str | None = None) -> jax.Array:
  """"Same" stride-1 depthwise conv of NHWC ``x`` with ``kernel`` (k, k, C) plus ``bias``
  (C,) (optional), float32 accumulation, result in ``x.dtype``.  Forward only (no VJP):
  the block's backward differentiates its own reference."""
  reason = unsupported_reason(x.shape, kernel.shape)
  if reason is not None:
    raise ValueError(f"dwconv_triton.depthwise_conv: {reason}")
  if bias is not None and tuple(bias.shape) != (x.shape[-1],):
    raise ValueError(f"dwconv_triton.depthwise_conv: bias must be ({x.shape[-1]},), "
                     f"got {tuple(bias.shape)}")
  n, h, w, c = x.shape
  k = kernel.shape[0]
  t = resolve_tiles(h, w, c, tiles)
  cpad = cm.cdiv(c, t.cblock) * t.cblock
  kflat = cm.pad_axis(kernel.reshape(k * k, c).astype(f32), 1, cpad).reshape(-1)
  b = jnp.zeros((c,), f32) if bias is None else bias.astype(f32)
  b = cm.pad_axis(b, 0, cpad)
  strips = cm.cdiv(h, t.strip)
  kern = functools.partial(_kernel, h=h, w=w, c=c, k=k, cpad=cpad, strips=strips, tiles=t,
                           diag=_diag)
  y = pl.pallas_call(
      kern,
      out_shape=jax.ShapeDtypeStruct((x.size,), x.dtype),
      grid=(n * strips, cm.cdiv(w, t.tile_w), cpad // t.cblock),
      compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
      interpret=interpret,
      name="depthwise_conv",
  )(x.reshape(-1), kflat, b)
  return y.reshape(x.shape)
