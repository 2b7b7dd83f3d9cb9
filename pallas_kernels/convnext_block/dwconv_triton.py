"""Depthwise k x k "same" convolution (+ bias) as a Pallas-Triton kernel.

The Mosaic forwards (mosaic.py) run the ConvNeXt block's pointwise half in Mosaic GPU
kernels; its 7x7 depthwise conv was XLA's, and that conv was half of the block's time
(0.32 of 0.60 ms at 56x56x96, batch 128, bf16, H200, 2026-11-25) at ~0.5 TB/s, against a
DRAM floor of ~0.03 ms.  It is compute-bound: 49 multiply-adds per output element.

Each program owns ``strip`` output rows x ``tile_w`` columns x ``cblock`` channels of one
image and keeps all ``strip`` output rows in float32 registers.  A ``fori_loop`` over the k
horizontal taps dx loads that column's k weights once; then, unrolled, it walks the strip's
strip + k - 1 input rows, loads each row shifted by dx once (masked: zero outside the
image) and adds it, times the right vertical tap, into every output row it feeds.  So
every multiply-add is useful (none for halo rows), each input row is loaded k times per
strip (mostly L1 hits), and the weights k*k times per strip.  The output rows are stored
once, plus bias, in the input dtype.

Every multiply-add is one ``fma.rn.f32`` (``_common.fma``): written as ``acc + v * tap``
Pallas-Triton compiled it to a separate FMUL and FADD, 74% of the executed instructions
with the issue slots 79% busy (ncu, H100, 2026-11-26).  Measured (H100, batch 128, bf16,
2026-11-26, ``python -m benchmarks.dwconv_kernel``): 0.197 / 0.097 / 0.060 / 0.064 ms at
ConvNeXt-T's four stage shapes (0.245 / 0.127 / 0.067 / 0.063 without the fma) vs XLA's
conv + bias 0.354 / 0.211 / 0.124 / 0.092 ms.  An earlier form -- a rolling window of k row
accumulators walking down a long strip, all k*k weights reloaded per input row -- only
matched XLA (it was bound by the weight loads through L1), and unrolling its row loop in
Python made Triton compile for ~3 minutes; both are why the loop is over dx here.

The transposed conv (the input gradient of a depthwise conv) is the same conv with the
taps mirrored: ``depthwise_conv(dy, kernel[::-1, ::-1])``.

Column-walk forms: ``DwconvTiles(columns=True)`` / ``WgradTiles(columns=True)`` give each
thread one channel and walk an image strip's columns left to right with the k input
columns around the current one in registers, so a loaded element feeds up to k*k
multiply-adds instead of k, and the bf16 unpacking and address arithmetic that the tile
kernels spend ~30% of their instructions on shrink accordingly; each column's loads are
issued one column ahead (``prefetch``).  Measured (H100, bf16, batch 128, 2026-11-27):
the conv 0.176 / 0.090 / 0.050 / 0.044 ms at the four stage shapes (tile kernel 0.193 /
0.096 / 0.048 / 0.047) -- ``depthwise_conv(tiles=None)`` runs the walk except at 8- to
16-wide images (``default_tiles``); the kernel gradient 0.226 / 0.120 / 0.068 / 0.059 ms
vs XLA's 0.229 / 0.132 / 0.099 / 2.136 and the tile kernel's 0.629 at 56x56x96
(``python -m benchmarks.dwconv_kernel --columns``, ``python -m benchmarks.dwconv_wgrad``).
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

# Float32 accumulator elements per program (strip x tile_w x cblock): 112 registers per
# thread at 4 warps, the largest that did not spill in the H100 sweep (56x56x96: strip 7 of
# 64 x 32 tiles 0.249 ms, strip 14 0.700 ms).
ACC_ELEMENTS = 14336
MAX_STRIP = 14


class DwconvTiles(NamedTuple):
  """strip: output rows per program (0: the largest with at most ACC_ELEMENTS accumulator
  elements, at most MAX_STRIP); tile_w: columns (power of two; 0: the image width rounded
  up, at most 64); cblock: channels (power of two); num_warps: Triton warps per program;
  fused_fma: one ``fma.rn.f32`` per multiply-add (``_common.fma``) instead of the separate
  multiply and add that Pallas-Triton's ``a * b + c`` compiles to (ignored in interpret
  mode).  columns: the column-walk kernel (``_conv_columns_kernel``) with ``rows``
  output rows per program (0: one strip; a multiple of strip), strip (0: min(7, H)),
  cblock (a power of two >= 32; num_warps = cblock // 32, one channel per thread),
  ``unroll`` columns per loop iteration (0: 1) and ``prefetch`` (each column's
  loads issued one column ahead, ``_walk_columns``; on by default: 0.176 vs 0.191 ms at
  56x56x96, H100, batch 128, 2026-11-27); tile_w is unused.  ``depthwise_conv(tiles=None)``
  picks the kernel by shape (``default_tiles``)."""

  strip: int = 0
  tile_w: int = 0
  cblock: int = 32
  num_warps: int = 4
  fused_fma: bool = True
  columns: bool = False
  rows: int = 0
  unroll: int = 0
  prefetch: bool = True


def _resolve_conv_columns(h: int, t: DwconvTiles) -> DwconvTiles:
  strip = min(t.strip or 7, h)
  rows = t.rows or strip
  if t.cblock < 32 or t.cblock & (t.cblock - 1):
    raise ValueError(f"DwconvTiles.cblock must be a power of two >= 32 with columns=True, "
                     f"got {t.cblock}")
  if t.strip < 0 or t.unroll < 0 or rows < 1 or rows % strip:
    raise ValueError(f"DwconvTiles.rows must be a positive multiple of strip (and strip, "
                     f"unroll >= 0) with columns=True, got {t}")
  return t._replace(strip=strip, rows=rows, num_warps=t.cblock // 32, tile_w=0,
                    unroll=t.unroll or 1)


def default_tiles(w: int, interpret: bool = False) -> DwconvTiles:
  """What ``depthwise_conv(tiles=None)`` runs: the column walk with its loads one column
  ahead, except on 8- to 16-wide images (and in the interpreter), where the tile kernel
  (``DwconvTiles()``) runs.  H100, bf16, 7x7, batch 128, 2026-11-27
  (``benchmarks.dwconv_kernel --columns``): walk / tile kernel 0.176 / 0.193 ms at
  56x56x96, 0.090 / 0.096 at 28x28x192, 0.050 / 0.048 at 14x14x384, 0.044 / 0.047 at
  7x7x768 (XLA's conv 0.355 / 0.216 / 0.114 / 0.085).  The interpreter runs each of the
  walk's per-column vector ops one by one (slow on a CPU); its tests name the walk's tiles."""
  if interpret or 8 <= w <= 16:
    return DwconvTiles()
  return DwconvTiles(columns=True, prefetch=True)


def resolve_tiles(h: int, w: int, c: int, tiles: DwconvTiles | None = None,
                  interpret: bool = False) -> DwconvTiles:
  """``tiles`` (default ``default_tiles(w, interpret)``) made concrete for an (h, w, c)
  image."""
  t = tiles or default_tiles(w, interpret)
  if t.columns:
    return _resolve_conv_columns(h, t)
  tile_w = t.tile_w or min(cm.next_power_of_2(w), 64)
  cblock = min(t.cblock, cm.next_power_of_2(c))
  for name, v in (("tile_w", tile_w), ("cblock", cblock)):
    if v < 1 or v & (v - 1):
      raise ValueError(f"DwconvTiles.{name} must be a power of two, got {v}")
  if t.strip < 0 or t.num_warps < 1:
    raise ValueError(f"DwconvTiles.strip must be >= 0 and num_warps >= 1, got {t}")
  strip = t.strip or max(1, min(MAX_STRIP, ACC_ELEMENTS // (tile_w * cblock)))
  return t._replace(strip=min(strip, h), tile_w=tile_w, cblock=cblock)


def _channel_block(c: int, cblock: int):
  """This program's channel block (grid axis 2): its first channel c0, the channel indices
  ch (clamped to valid ones in a partial last block) and ``mask_of(pix_ok)``, the
  (pixels, cblock) load/store mask of the valid pixels and channels."""
  c0 = pl.program_id(2) * cblock
  ch = c0 + jnp.arange(cblock, dtype=jnp.int32)
  ch_ok = None if c % cblock == 0 else ch < c
  if ch_ok is not None:
    ch = jnp.where(ch_ok, ch, 0)

  def mask_of(pix_ok):
    return pix_ok[:, None] if ch_ok is None else pix_ok[:, None] & ch_ok[None, :]
  return c0, ch, mask_of


def _conv_refs(refs, residual: bool, col_sums: bool):
  """The conv kernels' output refs after x, kernel and bias: ([r_ref,] y_ref [, s_ref]) ->
  (r_ref or None, y_ref, s_ref or None)."""
  refs = list(refs)
  r_ref = refs.pop(0) if residual else None
  y_ref = refs.pop(0)
  return r_ref, y_ref, refs.pop(0) if col_sums else None


def _kernel(x_ref, k_ref, b_ref, *refs, h, w, c, k, cpad, strips, tiles: DwconvTiles,
            residual: bool, col_sums: bool, fused_fma: bool):
  """refs: [r_ref,] y_ref [, s_ref]: y = conv(x) + b (+ r, a residual of y's shape); s_ref
  (``col_sums``): this program's sums of x over its own output pixels, per channel (for a
  bias gradient when x is a cotangent)."""
  r_ref, y_ref, s_ref = _conv_refs(refs, residual, col_sums)
  pad = k // 2
  strip, tile_w, cblock = tiles.strip, tiles.tile_w, tiles.cblock
  pid = pl.program_id(0)
  n = pid // strips
  r0 = (pid % strips) * strip
  ww = pl.program_id(1) * tile_w + jnp.arange(tile_w, dtype=jnp.int32)
  c0, ch, mask_of = _channel_block(c, cblock)


  def column_pass(dx, accs):
    taps = [jnp.broadcast_to(k_ref[pl.ds((dy * k + dx) * cpad + c0, cblock)][None, :],
                             (tile_w, cblock)) for dy in range(k)]
    iw = ww + (dx - pad)
    col_ok = (iw >= 0) & (iw < w)
    accs = list(accs)
    for t in range(strip + 2 * pad):
      i = r0 - pad + t
      ok = col_ok & (i >= 0) & (i < h)
      pix = jnp.where(ok, (n * h + i) * w + iw, 0)
      v = plgpu.load(x_ref.at[pix[:, None] * c + ch[None, :]], mask=mask_of(ok),
                     other=0).astype(f32)
      for dy in range(k):
        o = t - dy                        # output row r0 + o reads input row r0 + o + dy - pad
        if 0 <= o < strip:
          accs[o] = cm.fma(v, taps[dy], accs[o], fused=fused_fma)
    return tuple(accs)

  zero = jnp.zeros((tile_w, cblock), f32)
  accs = jax.lax.fori_loop(0, k, column_pass, (zero,) * strip)
  bias = b_ref[pl.ds(c0, cblock)][None, :]
  size = y_ref.shape[0]
  for o in range(strip):
    ok = (r0 + o < h) & (ww < w)
    pix = jnp.where(ok, (n * h + r0 + o) * w + ww, size // c + 1)
    out = accs[o] + bias
    if r_ref is not None:
      out = out + plgpu.load(r_ref.at[jnp.where(ok, pix, 0)[:, None] * c + ch[None, :]],
                             mask=mask_of(ok), other=0).astype(f32)
    plgpu.store(y_ref.at[pix[:, None] * c + ch[None, :]], out.astype(y_ref.dtype),
                mask=mask_of(ok))
  if s_ref is not None:  # after the stores, when the accumulators are dead
    tot = zero
    for o in range(strip):
      ok = (r0 + o < h) & (ww < w)
      pix = jnp.where(ok, (n * h + r0 + o) * w + ww, 0)
      tot = tot + plgpu.load(x_ref.at[pix[:, None] * c + ch[None, :]], mask=mask_of(ok),
                             other=0).astype(f32)
    part = pid * pl.num_programs(1) + pl.program_id(1)
    plgpu.store(s_ref.at[pl.ds(part * cpad + c0, cblock)], jnp.sum(tot, axis=0))


def _column_walk_access(c: int, cblock: int):
  """The column-walk kernels' channel block (grid axis 2: one channel per thread): its first
  channel c0, ``load(ref, row_base, row_ok, col, col_ok)`` -- one (cblock,) float32 vector of
  pixel (row_base + col) of an NHWC ref, zero where not ok or past the last channel -- and
  ``store(ref, row_base, row_ok, col, col_ok, value)``.  Row offsets / validity come once per
  strip and the clamped column once per column (``_strip_rows``), so a load costs a scalar
  add, a multiply and a vector add."""
  c0 = pl.program_id(2) * cblock
  ch = c0 + jnp.arange(cblock, dtype=jnp.int32)
  c_ok = None if c % cblock == 0 else ch < c
  if c_ok is not None:
    ch = jnp.where(c_ok, ch, 0)

  def mask(row_ok, col_ok):
    ok = row_ok & col_ok
    return ok if c_ok is None else c_ok & ok

  def load(ref, row_base, row_ok, col, col_ok):
    return plgpu.load(ref.at[(row_base + col) * c + ch], mask=mask(row_ok, col_ok),
                      other=0).astype(f32)

  def store(ref, row_base, row_ok, col, col_ok, value):
    plgpu.store(ref.at[(row_base + col) * c + ch], value.astype(ref.dtype),
                mask=mask(row_ok, col_ok))

  return c0, load, store


def _strip_rows(img, first_row, count: int, h: int, w: int):
  """Rows first_row .. first_row + count - 1 of image ``img``: each one's first pixel
  (clamped into the image) and validity, and ``column(col)`` -> (clamped col, validity)."""
  rows = [first_row + t for t in range(count)]
  row_ok = [(r >= 0) & (r < h) for r in rows]
  row_base = [(img * h + jnp.clip(r, 0, h - 1)) * w for r in rows]

  def column(col):
    return jnp.clip(col, 0, w - 1), (col >= 0) & (col < w)

  return row_base, row_ok, column


def _walk_columns(x_ref, load, rows, w: int, k: int, unroll: int, body, carry, *,
                  extra=None, prefetch: bool = False):
  """The column walk over one strip: ``rows`` = ``_strip_rows(...)`` of its strip + k - 1
  input rows.  For each output column col (0 .. w - 1, then up to unroll - 1 past the
  image, whose loads are masked), ``window`` holds the input columns col - k//2 ..
  col + k//2 (each a list of one vector per input row, zero off the image) and
  ``carry = body(col, cc, col_ok, window, more, carry)`` (cc / col_ok: the clamped column
  and its validity; ``more = extra(cc, col_ok)``, the caller's other loads at that column,
  or empty without ``extra``).  ``unroll`` columns per ``fori_loop`` iteration: the window
  rotates by renaming inside one and by register moves between them.

  ``prefetch``: a column's loads (its new input column and ``extra``) are issued one column
  ahead, before the previous column's arithmetic, and carried in registers: one vector per
  input row and per extra load more live registers, but a load's latency is covered by a
  column of multiply-adds instead of stalling the warp that issued it (the kernels run few
  warps per SM: ~150 live float32 registers per thread)."""
  row_base, row_ok, column = rows
  pad, r_in = k // 2, len(row_base)

  def x_column(col):
    cc, col_ok = column(col)
    return [load(x_ref, row_base[t], row_ok[t], cc, col_ok) for t in range(r_in)]

  def more_at(col):
    if extra is None:
      return []
    return list(extra(*column(col)))

  def loads_at(col):                         # the input column col + pad and col's extra loads
    return x_column(col + pad), more_at(col)

  def chunk(q, state):
    carry, flat, ahead = state
    window = [list(flat[j * r_in:(j + 1) * r_in]) for j in range(2 * pad)]
    for u in range(unroll):
      col = q * unroll + u
      if prefetch:
        new, more = list(ahead[:r_in]), list(ahead[r_in:])
        nxt = loads_at(col + 1)
        ahead = tuple(nxt[0]) + tuple(nxt[1])
      else:
        new, more = loads_at(col)
      window.append(new)
      cc, col_ok = column(col)
      carry = body(col, cc, col_ok, window, more, carry)
      window = window[1:]
    return carry, tuple(v for values in window for v in values), ahead

  first = tuple(v for col in range(-pad, pad) for v in x_column(col))
  ahead = ()
  if prefetch:
    new, more = loads_at(0)
    ahead = tuple(new) + tuple(more)
  carry, _, _ = jax.lax.fori_loop(0, cm.cdiv(w, unroll), chunk, (carry, first, ahead))
  return carry


def _conv_columns_kernel(x_ref, k_ref, b_ref, *refs, h, w, c, k, cpad, tiles: DwconvTiles,
                         residual: bool, col_sums: bool, fused_fma: bool):
  """The column walk (``DwconvTiles(columns=True)``), same outputs as ``_kernel``.  One
  program: image ``program_id(0)``, ``tiles.rows`` output rows in strips of ``tiles.strip``,
  ``cblock`` channels -- one channel per thread, its k*k taps in registers.  For each strip
  it walks the image's columns keeping the k input columns col - k//2 .. col + k//2
  (strip + k - 1 rows each) in registers: per output column one new input column is
  loaded and the strip's outputs are k*k-term fma chains over the window, stored with the
  bias (and the residual) added.  ``_kernel`` instead reloads each input row once per
  horizontal tap and feeds each load to at most k outputs (its profile: bf16 unpacking and
  address arithmetic ~30% of the instructions, H100 2026-11-26); here a loaded element
  feeds up to k*k outputs.  ``col_sums``: the strip's own pixels are the window's centre
  column, summed in registers."""
  r_ref, y_ref, s_ref = _conv_refs(refs, residual, col_sums)
  pad = k // 2
  strip, cblock, unroll = tiles.strip, tiles.cblock, tiles.unroll
  strips_per_program = tiles.rows // strip
  img, rg = pl.program_id(0), pl.program_id(1)
  c0, load, store = _column_walk_access(c, cblock)
  r_in = strip + 2 * pad
  taps = [k_ref[pl.ds(tap * cpad + c0, cblock)] for tap in range(k * k)]
  bias = b_ref[pl.ds(c0, cblock)]

  def strip_pass(s, sums):
    r0 = (rg * strips_per_program + s) * strip
    rows = _strip_rows(img, r0 - pad, r_in, h, w)
    row_base, row_ok, _ = rows

    def residual_at(cc, col_ok):             # the strip's residual at column cc
      return [load(r_ref, row_base[o + pad], row_ok[o + pad], cc, col_ok) for o in range(strip)]

    def body(col, cc, col_ok, window, res, sums):
      for o in range(strip):                 # output row r0 + o: input rows o .. o + 2 pad
        acc = bias
        for dy in range(k):
          for dx in range(k):
            acc = cm.fma(window[dx][o + dy], taps[dy * k + dx], acc, fused=fused_fma)
        if r_ref is not None:
          acc = acc + res[o]
        store(y_ref, row_base[o + pad], row_ok[o + pad], cc, col_ok, acc)
        if col_sums:                         # x at this output pixel (zero off the image)
          sums = sums + window[pad][o + pad]
      return sums

    return _walk_columns(x_ref, load, rows, w, k, unroll, body, sums,
                         extra=residual_at if r_ref is not None else None,
                         prefetch=tiles.prefetch)

  sums = jax.lax.fori_loop(0, strips_per_program, strip_pass, jnp.zeros((cblock,), f32))
  if s_ref is not None:
    part = img * pl.num_programs(1) + rg
    plgpu.store(s_ref.at[pl.ds(part * cpad + c0, cblock)], sums)


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


@functools.partial(jax.jit, static_argnames=("tiles", "col_sums", "interpret"))
def depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
                   residual: jax.Array | None = None, *, tiles: DwconvTiles | None = None,
                   col_sums: bool = False, interpret: bool = False):
  """"Same" stride-1 depthwise conv of NHWC ``x`` with ``kernel`` (k, k, C) plus ``bias``
  (C,) and ``residual`` (x's shape) (both optional), float32 accumulation, result in
  ``x.dtype``.  No VJP of its own: ``dwconv.depthwise_conv(conv="pallas")`` wraps it in one
  (input gradient = this conv with mirrored taps; ``residual`` lets a caller add another
  cotangent of x in the same pass).  ``col_sums=True`` returns ``(y, x summed over N, H and
  W in float32)`` -- when x is the cotangent of a conv output, the gradient of that conv's
  bias -- from per-program partial sums instead of a separate pass over x.  ``tiles=None``:
  ``default_tiles``."""
  reason = unsupported_reason(x.shape, kernel.shape)
  if reason is not None:
    raise ValueError(f"dwconv_triton.depthwise_conv: {reason}")
  if bias is not None and tuple(bias.shape) != (x.shape[-1],):
    raise ValueError(f"dwconv_triton.depthwise_conv: bias must be ({x.shape[-1]},), "
                     f"got {tuple(bias.shape)}")
  if residual is not None and residual.shape != x.shape:
    raise ValueError(f"dwconv_triton.depthwise_conv: residual must have x's shape {x.shape}, "
                     f"got {residual.shape}")
  n, h, w, c = x.shape
  k = kernel.shape[0]
  t = resolve_tiles(h, w, c, tiles, interpret)
  cpad = cm.cdiv(c, t.cblock) * t.cblock
  kflat = cm.pad_axis(kernel.reshape(k * k, c).astype(f32), 1, cpad).reshape(-1)
  b = jnp.zeros((c,), f32) if bias is None else bias.astype(f32)
  b = cm.pad_axis(b, 0, cpad)
  flags = dict(h=h, w=w, c=c, k=k, cpad=cpad, tiles=t, residual=residual is not None,
               col_sums=col_sums, fused_fma=t.fused_fma and not interpret)
  if t.columns:
    kern = functools.partial(_conv_columns_kernel, **flags)
    grid = (n, cm.cdiv(h, t.rows), cpad // t.cblock)
  else:
    strips = cm.cdiv(h, t.strip)
    kern = functools.partial(_kernel, strips=strips, **flags)
    grid = (n * strips, cm.cdiv(w, t.tile_w), cpad // t.cblock)
  out_shape = [jax.ShapeDtypeStruct((x.size,), x.dtype)]
  if col_sums:
    out_shape.append(jax.ShapeDtypeStruct((grid[0] * grid[1] * cpad,), f32))
  y, *parts = pl.pallas_call(
      kern,
      out_shape=out_shape,
      grid=grid,
      compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=1),
      interpret=interpret,
      name="depthwise_conv",
  )(x.reshape(-1), kflat, b, *([] if residual is None else [residual.reshape(-1)]))
  if col_sums:
    return y.reshape(x.shape), parts[0].reshape(-1, cpad).sum(0)[:c]
  return y.reshape(x.shape)


# ------------------------------------------------------------------ kernel (weight) gradient


class WgradTiles(NamedTuple):
  """one_pass: the kernel walks each image column tile once, keeping all k*k tap
  accumulators (``_wgrad_one_pass_kernel``), instead of once per horizontal tap with k
  accumulators (``_wgrad_kernel``).  strip: output rows per inner step (0: min(7, H));
  tile_w: columns per program (power of two; 0: the image width rounded up, at most 32, or
  16 in one pass); cblock: channels (power of two; 0: 32, or 256 // tile_w in one pass);
  num_warps: Triton warps per program; fused_fma: as in ``DwconvTiles``; images: images
  each program walks (one pass only: the k*k column sums and partial stores per program
  are paid once per ``images`` images).  columns: the column walk
  (``_wgrad_columns_kernel``) with strip, ``rows`` per program, cblock, ``unroll`` and
  ``prefetch`` (each column's loads issued one column ahead, ``_walk_columns``; on by
  default: H100, batch 128, 2026-11-27, 0.308 -> 0.133 ms at 28x28x192, 0.298 -> 0.253 at
  56x56x96 with 128 channels per program)."""

  strip: int = 0
  tile_w: int = 0
  cblock: int = 0
  num_warps: int = 4
  fused_fma: bool = True
  one_pass: bool = False
  images: int = 1
  columns: bool = False
  rows: int = 0
  unroll: int = 0
  prefetch: bool = True


def _resolve_columns_tiles(h: int, c: int, t: WgradTiles) -> WgradTiles:
  """Tiles of the column-walk kernel: strip (0: min(7, H)), rows per program (0: two
  strips; a multiple of strip), cblock (0: 64 below 384 channels, else 128), num_warps =
  cblock // 32 (one channel per thread), unroll (0: 1) columns per loop iteration.  The
  defaults are the fastest measured (H100, bf16, batch 128, 2026-11-27,
  ``benchmarks.dwconv_wgrad``, with ``prefetch``): 64 / 128 channels 0.226 / 0.253 ms at
  56x56x96, 0.120 / 0.133 at 28x28x192, 0.068 / 0.068 at 14x14x384, 0.068 / 0.059 at
  7x7x768; 28 rows per program 0.245 / 0.122 / 0.120 / 0.089 (128 channels)."""
  strip = min(t.strip or 7, h)
  rows = t.rows or 2 * strip
  cblock = t.cblock or (64 if c < 384 else 128)
  if cblock & (cblock - 1) or cblock < 32:
    raise ValueError(f"WgradTiles.cblock must be a power of two >= 32 with columns=True, "
                     f"got {cblock}")
  if t.strip < 0 or rows < 1 or rows % strip:
    raise ValueError(f"WgradTiles.rows must be a positive multiple of strip with "
                     f"columns=True, got {t}")
  if t.one_pass or t.images != 1 or t.unroll < 0:
    raise ValueError(f"WgradTiles.columns=True excludes one_pass and images (unroll >= 0), "
                     f"got {t}")
  return t._replace(strip=strip, rows=rows, cblock=cblock, num_warps=cblock // 32, tile_w=0,
                    unroll=t.unroll or 1)


def resolve_wgrad_tiles(h: int, w: int, c: int, tiles: WgradTiles | None = None) -> WgradTiles:
  t = tiles or WgradTiles()
  if t.columns:
    return _resolve_columns_tiles(h, c, t)
  tile_w = t.tile_w or min(cm.next_power_of_2(w), 16 if t.one_pass else 32)
  cblock = t.cblock or (max(8, 256 // tile_w) if t.one_pass else 32)
  cblock = min(cblock, cm.next_power_of_2(c))
  for name, v in (("tile_w", tile_w), ("cblock", cblock)):
    if v < 1 or v & (v - 1):
      raise ValueError(f"WgradTiles.{name} must be a power of two, got {v}")
  if t.strip < 0 or t.num_warps < 1 or t.images < 1:
    raise ValueError(f"WgradTiles.strip must be >= 0, num_warps and images >= 1, got {t}")
  if t.images > 1 and not t.one_pass:
    raise ValueError(f"WgradTiles.images > 1 needs one_pass=True, got {t}")
  return t._replace(strip=min(t.strip or 7, h), tile_w=tile_w, cblock=cblock)


def _wgrad_program(n_images: int, h: int, w: int, c: int, tiles: WgradTiles):
  """What a kernel-gradient program (images ``tiles.images`` * program 0 onwards, column
  tile = program 1, channel block = program 2) works on: its columns ww, first channel c0,
  the number of row strips, its partial-sum slot, and ``load_row(ref, i, cols, img=0)``:
  row i of the program's image ``img`` at columns ``cols`` (zero outside the image or past
  the last image) in float32."""
  n0 = pl.program_id(0) * tiles.images
  wt = pl.program_id(1)
  ww = wt * tiles.tile_w + jnp.arange(tiles.tile_w, dtype=jnp.int32)
  c0, ch, mask_of = _channel_block(c, tiles.cblock)

  def load_row(ref, i, cols, img=0):
    n = n0 + img
    ok = (cols >= 0) & (cols < w) & (i >= 0) & (i < h)
    if tiles.images > 1 and n_images % tiles.images:
      ok = ok & (n < n_images)
    pix = jnp.where(ok, (n * h + i) * w + cols, 0)
    return plgpu.load(ref.at[pix[:, None] * c + ch[None, :]], mask=mask_of(ok),
                      other=0).astype(f32)

  return ww, c0, cm.cdiv(h, tiles.strip), pl.program_id(0) * pl.num_programs(1) + wt, load_row


def _wgrad_one_pass_kernel(x_ref, g_ref, o_ref, *, n, h, w, c, k, cpad, tiles: WgradTiles,
                           fused_fma: bool):
  """One program: image n, ``tile_w`` columns, ``cblock`` channels, all k*k taps.  It walks
  the image once in strips: a strip's dy rows are loaded once and kept, then for each
  horizontal tap dx (unrolled) each of the strip + k - 1 input rows is loaded shifted by dx
  -- the same few rows k times in a row, so L1 hits -- and multiplied into the accumulator
  of every vertical tap that pairs it with a strip row.  k*k accumulators of tile_w x
  cblock float32 (with the default 256-element tiles, 2 registers each per thread at 4
  warps).  At the end each accumulator is summed over the tile's columns and stored as this
  program's partial kernel gradient; XLA sums the partials.  (``_wgrad_kernel`` walks the
  image once per dx instead, with k accumulators, and by the time it re-reads a row for the
  next dx the row has left L1.)  Measured (H100, batch 128, bf16, 2026-11-26): 1.4-1.7x
  faster than ``_wgrad_kernel`` at 56x56x96 and 28x28x192 (0.356 / 0.238 ms with 8 x 32
  tiles) but still slower than XLA's kernel gradient (0.227 / 0.131), so it is an option,
  not a default.  2026-11-27 (H100, same settings, XLA in the same run): the 49 column sums
  were not the cost -- 2, 4 or 8 images per program (``tiles.images``) gave 0.38-0.39 ms at
  56x56x96 (1 image: 0.364) and 0.199-0.246 at 28x28x192 (0.240); longer strips did help:
  strip 14 with 4 images 0.271 at 56x56x96 (XLA 0.226) and **0.087 at 14x14x384 (XLA
  0.100)**, the first shape where a Pallas kernel gradient beat XLA's.  Strips of 28 or 56
  rows unroll into so much code that Triton's compile took minutes (not measured).  Not a
  default: the block-level effect at 14x14x384 is unmeasured."""
  pad = k // 2
  strip, tile_w, cblock = tiles.strip, tiles.tile_w, tiles.cblock
  ww, c0, strips, part, load_row = _wgrad_program(n, h, w, c, tiles)

  def strip_pass(step, accs):
    # lax.div / rem (step >= 0): jnp's floor division does not lower in Pallas-Triton.
    img, s = jax.lax.div(step, strips), jax.lax.rem(step, strips)
    r0 = s * strip
    gs = [load_row(g_ref, r0 + o, ww, img) for o in range(strip)]
    accs = list(accs)
    for dx in range(k):
      iw = ww + (dx - pad)
      for t in range(strip + 2 * pad):
        v = load_row(x_ref, r0 - pad + t, iw, img)
        for dy in range(k):
          o = t - dy                      # x row r0 + o + dy - pad pairs with dy row r0 + o
          if 0 <= o < strip:
            accs[dy * k + dx] = cm.fma(v, gs[o], accs[dy * k + dx], fused=fused_fma)
    return tuple(accs)

  zero = jnp.zeros((tile_w, cblock), f32)
  accs = jax.lax.fori_loop(0, strips * tiles.images, strip_pass, (zero,) * (k * k))
  for tap in range(k * k):
    off = (part * k * k + tap) * cpad
    plgpu.store(o_ref.at[pl.ds(off + c0, cblock)], jnp.sum(accs[tap], axis=0))


def _wgrad_kernel(x_ref, g_ref, o_ref, *, n, h, w, c, k, cpad, tiles: WgradTiles,
                  fused_fma: bool):
  """One program: image n, ``tile_w`` columns, ``cblock`` channels.  For each horizontal tap
  dx (fori_loop) it keeps k accumulators (one per vertical tap dy, tile_w x cblock float32)
  and walks the image in strips: the strip's dy rows are loaded once, each of its
  strip + k - 1 input rows once (shifted by dx, zero outside the image) and multiplied into
  the accumulator of every vertical tap that pairs it with a strip row.  After the last strip
  each accumulator is summed over the tile's columns (one cross-thread reduction per tap)
  and stored as this program's partial kernel gradient; XLA sums the partials."""
  pad = k // 2
  strip, tile_w, cblock = tiles.strip, tiles.tile_w, tiles.cblock
  ww, c0, strips, part, load_row = _wgrad_program(n, h, w, c, tiles)

  def column_pass(dx, carry):
    iw = ww + (dx - pad)

    def strip_pass(s, accs):
      r0 = s * strip
      gs = [load_row(g_ref, r0 + o, ww) for o in range(strip)]
      accs = list(accs)
      for t in range(strip + 2 * pad):
        v = load_row(x_ref, r0 - pad + t, iw)
        for dy in range(k):
          o = t - dy                      # x row r0 + o + dy - pad pairs with dy row r0 + o
          if 0 <= o < strip:
            accs[dy] = cm.fma(v, gs[o], accs[dy], fused=fused_fma)
      return tuple(accs)

    zero = jnp.zeros((tile_w, cblock), f32)
    accs = jax.lax.fori_loop(0, strips, strip_pass, (zero,) * k)
    for dy in range(k):
      off = ((part * k + dy) * k + dx) * cpad
      plgpu.store(o_ref.at[pl.ds(off + c0, cblock)], jnp.sum(accs[dy], axis=0))
    return carry

  jax.lax.fori_loop(0, k, column_pass, 0)


def _wgrad_columns_kernel(x_ref, g_ref, o_ref, *, n, h, w, c, k, cpad, tiles: WgradTiles,
                          fused_fma: bool):
  """The column walk.  One program: image ``program_id(0)``, ``tiles.rows`` dy rows (in
  strips of ``tiles.strip``), ``cblock`` channels -- one channel per thread, each row of a
  column a separate (cblock,) vector.  For each strip it walks the image's columns left to
  right keeping a window of the k input columns x - k//2 .. x + k//2 (strip + k - 1 rows
  each) in registers: per column one new input column and the strip's dy values are loaded
  and all k*k*strip multiply-adds of that column are done from registers (k*k accumulators
  per channel).  The other kernels here reload each input row once per horizontal tap
  (k-1 of every k loads an L1 hit of data already loaded), which left them issue-bound on
  loads, address arithmetic and bf16 unpacking; here each input element is loaded
  (strip + k - 1) / strip times and used k*k*strip / (strip + k - 1) times per load.  The
  column loop runs ``tiles.unroll`` columns per iteration (the window rotates by renaming
  inside an iteration and by register moves between iterations).  Each program stores its
  k*k partial sums; XLA sums the partials.

  Compile time: unrolled 7 columns at a time (2,401 multiply-adds per iteration with strip
  7) one such kernel took about two minutes in Triton on the H100 machine (2026-11-27; the
  run was cut off before any timing) -- hence unroll 1 by default (5-10 s per shape).
  Measured (H100, bf16, batch 128, 2026-11-27, default tiles): 0.226 / 0.120 / 0.068 /
  0.059 ms at the ConvNeXt-T stage shapes vs XLA's kernel gradient 0.229 / 0.132 / 0.099 /
  2.136 (``benchmarks.dwconv_wgrad``)."""
  pad = k // 2
  strip, cblock, unroll = tiles.strip, tiles.cblock, tiles.unroll
  strips_per_program = tiles.rows // strip
  img, rg = pl.program_id(0), pl.program_id(1)
  c0, load, _ = _column_walk_access(c, cblock)
  r_in = strip + 2 * pad                     # input rows of a strip

  def strip_pass(s, accs):
    r0 = (rg * strips_per_program + s) * strip
    rows = _strip_rows(img, r0 - pad, r_in, h, w)
    row_base, row_ok, _ = rows

    def dy_at(cc, col_ok):                   # dy rows r0 .. r0 + strip - 1 at column cc
      return [load(g_ref, row_base[o + pad], row_ok[o + pad], cc, col_ok)  # zero off the
              for o in range(strip)]                                         # image

    def body(col, cc, col_ok, window, gs, accs):
      accs = list(accs)
      for dy in range(k):
        for dx in range(k):
          tap = dy * k + dx
          for o in range(strip):             # x row r0 + o + dy - pad pairs with dy row r0 + o
            accs[tap] = cm.fma(window[dx][o + dy], gs[o], accs[tap], fused=fused_fma)
      return tuple(accs)

    return _walk_columns(x_ref, load, rows, w, k, unroll, body, accs, extra=dy_at,
                         prefetch=tiles.prefetch)

  zero = jnp.zeros((cblock,), f32)
  accs = jax.lax.fori_loop(0, strips_per_program, strip_pass, (zero,) * (k * k))
  part = img * pl.num_programs(1) + rg
  for tap in range(k * k):
    plgpu.store(o_ref.at[pl.ds((part * k * k + tap) * cpad + c0, cblock)], accs[tap])


@functools.partial(jax.jit, static_argnames=("k", "tiles", "interpret"))
def depthwise_conv_wgrad(x: jax.Array, dy: jax.Array, k: int, *,
                         tiles: WgradTiles | None = None, interpret: bool = False) -> jax.Array:
  """The kernel gradient (k, k, C), float32, of the "same" stride-1 depthwise conv of NHWC
  ``x``: dW[i, j, c] = sum_{n,h,w} x[n, h + i - k//2, w + j - k//2, c] dy[n, h, w, c] (zero
  outside the image), float32 accumulation: per-program partial sums (``_wgrad_kernel``)
  reduced by XLA."""
  reason = unsupported_reason(x.shape, (k, k, x.shape[-1]))
  if reason is not None:
    raise ValueError(f"dwconv_triton.depthwise_conv_wgrad: {reason}")
  if dy.shape != x.shape:
    raise ValueError(f"dwconv_triton.depthwise_conv_wgrad: dy must have x's shape "
                     f"{tuple(x.shape)}, got {tuple(dy.shape)}")
  n, h, w, c = x.shape
  t = resolve_wgrad_tiles(h, w, c, tiles)
  cpad = cm.cdiv(c, t.cblock) * t.cblock
  flags = dict(n=n, h=h, w=w, c=c, k=k, cpad=cpad, tiles=t,
               fused_fma=t.fused_fma and not interpret)
  if t.columns:
    kern, name = _wgrad_columns_kernel, "depthwise_conv_wgrad_columns"
    grid = (n, cm.cdiv(h, t.rows), cpad // t.cblock)
  else:
    kern = _wgrad_one_pass_kernel if t.one_pass else _wgrad_kernel
    name = "depthwise_conv_wgrad"
    grid = (cm.cdiv(n, t.images), cm.cdiv(w, t.tile_w), cpad // t.cblock)
  parts = pl.pallas_call(
      functools.partial(kern, **flags),
      out_shape=jax.ShapeDtypeStruct((grid[0] * grid[1] * k * k * cpad,), f32),
      grid=grid,
      compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=1),
      interpret=interpret,
      name=name,
  )(x.reshape(-1), dy.astype(x.dtype).reshape(-1))
  return parts.reshape(grid[0] * grid[1], k, k, cpad).sum(0)[..., :c]
