"""Fused ConvNeXt block in Pallas (Triton lowering): forward in one launch, backward in
two launches plus two XLA GEMMs (or three launches with wgrad="pallas").

Forward (``_forward_kernel``, one launch): each program owns one (tile_h x tile_w) pixel
tile of one image.  It gathers the tile and its k//2-pixel halo straight from x with
masked loads (k*k shifted loads per channel block, zero outside the image), computes the
depthwise conv + bias and LayerNorm in float32 registers, then loops over the hidden
dimension in chunks: h = GELU(zn @ W1[:, chunk] + b1[chunk]); acc += h @ W2[chunk, :], so
the 4C-wide activation lives only in registers; finally y = x + dps[n] * gamma * (acc + b2)
is written once.  DRAM traffic: x (+ halo re-reads, mostly L1/L2 hits), the weights (from
L2 after the first programs), y.

Channels are split into equal power-of-two blocks (``_common.channel_blocking``: 96 = 3 x
32, 768 = 6 x 128) and every (pixels x C) tensor is a Python list of (pixels x block)
tensors, so no matmul work is spent on padding channels.

Backward, two Pallas launches plus XLA GEMMs (the forward saves only x, params,
drop_path_scale; everything else is recomputed on chip, as flash attention does):
  A ``_backward_tile_kernel``: per pixel tile, recomputes dwconv + LN + the MLP chunk by
    chunk and back-propagates through GELU, the MLP and LN on chip; writes dz (gradient
    w.r.t. the dwconv output, C wide, not 4C), zn (the normalised LN output, C wide, for
    the weight gradients), and per-tile partial sums for the small vectors (ln_scale, ln_bias,
    sum of g*dps for fc2_bias/gamma, drop_path_scale).  It cannot also produce the dwconv
    input gradient: that needs dz of the neighbouring tiles (the halo).
  fc1/fc2 weight gradients are reductions over all pixels (K = N*H*W): matmuls whose
    (C x 4C) outputs are far too big to keep per tile.  Two ways, chosen by
    ``ConvNeXtTiles.wgrad``:
    "gemm" (default): kernel A also writes h = GELU(hpre) and dh (the gradient w.r.t.
      hpre), 4C wide in x.dtype, plus per-tile sums of dh (fc1_bias); XLA's GEMMs then
      compute dW1 = zn^T dh and G = h^T (g*dps).  The 4C tensors do touch DRAM in the
      backward (once written, once read), as in XLA's own backward.
    "pallas": kernel W ``_weight_grad_kernel``: each program owns one hidden chunk and a
      range of pixel rows of (zn, g), recomputes h and dh for its chunk, accumulates
      dW1[:, chunk] and G[chunk, :] in registers and writes one partial per program.  No
      4C tensor in DRAM, but zn and g are re-read once per hidden chunk and the dots are
      small: kernel W alone measured 1.0-11.7 ms (H100, ConvNeXt-T stages, bf16, batch
      128, 2026-11-24), and switching to "gemm" cut the whole backward from 6.6 to 4.4 ms
      at 56x56x96 and from 14.6 to 2.7 ms at 7x7x768, so it is kept only as an option
      (and is tested).
    dW2 = G * gamma and dgamma = sum_k W2 * G + b2 * sum(g*dps) follow from G in XLA.
  B ``_dwconv_backward_kernel``: per (pixel tile, channel block): dx = g + transposed
    depthwise conv of dz (halo gathers of dz), and partial dk (k*k taps) and dw_bias
    sums per program; XLA sums the partials.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common as cm
from pallas_kernels.convnext_block.reference import ConvNeXtBlockParams
from pallas_kernels.convnext_block.tuning import ConvNeXtTiles

f32 = jnp.float32


def _tile_coords(t, tiling: cm.SpatialTiling):
  """Image index and the (h, w) coordinates of each pixel of tile number t."""
  n = t // tiling.per_image
  r = t % tiling.per_image
  h0 = (r // tiling.tiles_w) * tiling.tile_h
  w0 = (r % tiling.tiles_w) * tiling.tile_w
  pix = jnp.arange(tiling.pixels, dtype=jnp.int32)
  return n, h0 + pix // tiling.tile_w, w0 + pix % tiling.tile_w


def _dwconv_tile(x_ref, dwk_ref, dwb_ref, n, hh, ww, valid, blocks, h, w, c, k):
  """Depthwise k x k conv + bias of one tile: list of (pixels, block) float32."""
  pad = k // 2
  pixels = hh.shape[0]

  def row(dy, zs):
    ih = hh + (dy - pad)
    out = list(zs)
    for dx in range(k):
      iw = ww + (dx - pad)
      for bi, (c0, width) in enumerate(blocks):
        xv = cm.load_nhwc_tap(x_ref, n, ih, iw, valid, c0, width, h, w, c).astype(f32)
        kv = dwk_ref[dy * k + dx, pl.ds(c0, width)]
        out[bi] = out[bi] + xv * kv[None, :]
    return tuple(out)

  zs = tuple(jnp.zeros((pixels, width), f32) for _, width in blocks)
  zs = lax.fori_loop(0, k, row, zs)
  return [z + dwb_ref[pl.ds(c0, width)][None, :] for z, (c0, width) in zip(zs, blocks)]


def _layer_norm_tile(z, blocks, c, eps):
  """(zhat blocks with padded channels zeroed, rstd)."""
  total = sum(jnp.sum(zb, axis=1) for zb in z)
  mean = total / c
  d = []
  for zb, (c0, width) in zip(z, blocks):
    if c0 + width <= c:
      d.append(zb - mean[:, None])
    else:
      ch = c0 + jnp.arange(width, dtype=jnp.int32)
      d.append(jnp.where((ch < c)[None, :], zb - mean[:, None], 0.0))
  var = sum(jnp.sum(db * db, axis=1) for db in d) / c
  rstd = lax.rsqrt(var + eps)
  return [db * rstd[:, None] for db in d], rstd


def _blocks(cb: cm.ChannelBlocking):
  return [(i * cb.block, cb.block) for i in range(cb.num)]


# ---------------------------------------------------------------------------------------
# Forward
def _forward_kernel(x_ref, dps_ref, dwk_ref, dwb_ref, lns_ref, lnb_ref, w1_ref, b1_ref,
                    w2_ref, b2_ref, gamma_ref, y_ref, *, h, w, c, k, tiling, cb, chunk,
                    hidden_padded, eps, dtype, parts="all"):
  blocks = _blocks(cb)
  n, hh, ww = _tile_coords(pl.program_id(0), tiling)
  valid = (hh < h) & (ww < w)
  if parts == "no_dwconv":  # diagnostic only: a 1x1 "conv" (one tap) instead of k x k
    z = _dwconv_tile(x_ref, dwk_ref, dwb_ref, n, hh, ww, valid, blocks, h, w, c, 1)
  else:
    z = _dwconv_tile(x_ref, dwk_ref, dwb_ref, n, hh, ww, valid, blocks, h, w, c, k)
  zhat, _ = _layer_norm_tile(z, blocks, c, eps)
  zn = [(zb * lns_ref[pl.ds(c0, wd)][None, :] + lnb_ref[pl.ds(c0, wd)][None, :]).astype(dtype)
        for zb, (c0, wd) in zip(zhat, blocks)]

  def mlp_chunk(j, acc):
    j0 = pl.multiple_of(j * chunk, chunk)
    hpre = b1_ref[pl.ds(j0, chunk)][None, :]
    for znb, (c0, wd) in zip(zn, blocks):
      hpre = hpre + jnp.dot(znb, w1_ref[pl.ds(c0, wd), pl.ds(j0, chunk)],
                            preferred_element_type=f32)
    hact = cm.gelu_exact(hpre).astype(dtype)
    return tuple(a + jnp.dot(hact, w2_ref[pl.ds(j0, chunk), pl.ds(c0, wd)],
                             preferred_element_type=f32)
                 for a, (c0, wd) in zip(acc, blocks))

  acc = tuple(jnp.zeros((tiling.pixels, wd), f32) for _, wd in blocks)
  if parts == "no_mlp":  # diagnostic only: skip the two 1x1 convs
    acc = tuple(znb.astype(f32) for znb in zn)
  else:
    acc = lax.fori_loop(0, hidden_padded // chunk, mlp_chunk, acc)
  scale = dps_ref[n]
  for a, (c0, wd) in zip(acc, blocks):
    xv = cm.load_nhwc_tap(x_ref, n, hh, ww, valid, c0, wd, h, w, c).astype(f32)
    branch = (a + b2_ref[pl.ds(c0, wd)][None, :]) * gamma_ref[pl.ds(c0, wd)][None, :]
    cm.store_nhwc(y_ref, xv + scale * branch, n, hh, ww, valid, c0, wd, h, w, c)


class _Prepared:
  """Weights padded to whole channel blocks / hidden chunks, in the layouts the kernels
  read (small XLA ops on parameter-sized arrays)."""

  def __init__(self, params: ConvNeXtBlockParams, c: int, cb: cm.ChannelBlocking,
               hidden_padded: int, dtype):
    k = params.dw_kernel.shape[0]
    cp = cb.padded
    vec = lambda v: cm.pad_axis(v.astype(f32), 0, cp)
    self.dwk = cm.pad_axis(params.dw_kernel.reshape(k * k, c).astype(f32), 1, cp)
    self.dwb, self.lns, self.lnb = vec(params.dw_bias), vec(params.ln_scale), vec(params.ln_bias)
    self.b2, self.gamma = vec(params.fc2_bias), vec(params.gamma)
    w1 = cm.pad_axis(cm.pad_axis(params.fc1_kernel.astype(dtype), 0, cp), 1, hidden_padded)
    w2 = cm.pad_axis(cm.pad_axis(params.fc2_kernel.astype(dtype), 0, hidden_padded), 1, cp)
    self.w1, self.w2 = w1, w2
    self.b1 = cm.pad_axis(params.fc1_bias.astype(f32), 0, hidden_padded)


def _matmul_blocking(c, hidden, tiles: ConvNeXtTiles, chunk):
  cb = cm.channel_blocking(c, tiles.channel_block)
  chunk, hidden_padded = cm.hidden_blocking(hidden, chunk)
  return cb, chunk, hidden_padded


def forward(x, params: ConvNeXtBlockParams, dps, *, eps, tiles: ConvNeXtTiles, interpret,
            _parts: str = "all"):
  """y of the block.  ``_parts`` ("no_dwconv" / "no_mlp") drops a stage: for timing
  diagnostics only (profile_kernels), the result is then not the block."""
  n_, h, w, c = x.shape
  k = params.dw_kernel.shape[0]
  hidden = params.fc1_kernel.shape[1]
  cm.check_flat_size(x.shape, (n_ * h * w + 2, hidden))
  cb, chunk, hidden_padded = _matmul_blocking(c, hidden, tiles, tiles.fwd_hidden)
  tiling = cm.spatial_tiling(h, w, tiles.fwd_pixels, tiles.fwd_tile_w)
  p = _Prepared(params, c, cb, hidden_padded, x.dtype)
  kernel = functools.partial(
      _forward_kernel, h=h, w=w, c=c, k=k, tiling=tiling, cb=cb, chunk=chunk,
      hidden_padded=hidden_padded, eps=eps, dtype=x.dtype, parts=_parts)
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((x.size,), x.dtype),
      grid=(n_ * tiling.per_image,),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.fwd_warps,
                                           num_stages=tiles.fwd_stages),
      interpret=interpret,
      name="convnext_block_fwd",
  )(x.reshape(-1), dps.astype(f32), p.dwk, p.dwb, p.lns, p.lnb, p.w1, p.b1, p.w2, p.b2,
    p.gamma)
  return y.reshape(x.shape)


# ---------------------------------------------------------------------------------------
# Backward A: per tile, recompute and back-propagate through MLP and LayerNorm.
def _backward_tile_kernel(x_ref, g_ref, dps_ref, dwk_ref, dwb_ref, lns_ref, lnb_ref, w1_ref,
                          b1_ref, w2_ref, b2_ref, gamma_ref,
                          dz_ref, zn_ref, vec_ref, ddps_ref, *hdh_refs,
                          h, w, c, k, tiling, cb, chunk, hidden, hidden_padded, eps, dtype):
  # hdh_refs = (h_ref, dh_ref, db1_ref) when the weight gradients go through XLA GEMMs
  blocks = _blocks(cb)
  t = pl.program_id(0)
  n, hh, ww = _tile_coords(t, tiling)
  valid = (hh < h) & (ww < w)
  z = _dwconv_tile(x_ref, dwk_ref, dwb_ref, n, hh, ww, valid, blocks, h, w, c, k)
  zhat, rstd = _layer_norm_tile(z, blocks, c, eps)
  scale = dps_ref[n]
  zn, gg = [], []
  b2_term = jnp.zeros((), f32)
  for zb, (c0, wd) in zip(zhat, blocks):
    znb = (zb * lns_ref[pl.ds(c0, wd)][None, :] + lnb_ref[pl.ds(c0, wd)][None, :]).astype(dtype)
    cm.store_nhwc(zn_ref, znb, n, hh, ww, valid, c0, wd, h, w, c)
    zn.append(znb)
    gb = cm.load_nhwc_tap(g_ref, n, hh, ww, valid, c0, wd, h, w, c).astype(f32)
    ggb = gb * gamma_ref[pl.ds(c0, wd)][None, :]
    gg.append(ggb.astype(dtype))
    colsum_g = jnp.sum(gb, axis=0)
    b2_term = b2_term + jnp.sum(jnp.sum(ggb, axis=0) * b2_ref[pl.ds(c0, wd)])
    vec_ref[t, 2, pl.ds(c0, wd)] = colsum_g * scale

  def mlp_chunk(j, carry):
    dzn, ddps_acc = carry
    j0 = pl.multiple_of(j * chunk, chunk)
    hpre = b1_ref[pl.ds(j0, chunk)][None, :]
    q = jnp.zeros((tiling.pixels, chunk), f32)
    for znb, ggb, (c0, wd) in zip(zn, gg, blocks):
      hpre = hpre + jnp.dot(znb, w1_ref[pl.ds(c0, wd), pl.ds(j0, chunk)],
                            preferred_element_type=f32)
      # (g * gamma) @ W2[chunk, :]^T, the branch gradient before drop-path scaling
      q = q + jnp.dot(ggb, w2_ref[pl.ds(j0, chunk), pl.ds(c0, wd)].T,
                      preferred_element_type=f32)
    hact, dgelu = cm.gelu_exact_and_grad(hpre)
    ddps_acc = ddps_acc + jnp.sum(hact * q, axis=0)
    dh32 = q * dgelu * scale
    dh = dh32.astype(dtype)
    if hdh_refs:
      h_ref, dh_ref, db1_ref = hdh_refs
      # rows of the (M, hidden) matrices: pixel index within the flat NHWC array
      # (masked lanes point past the end: see _common.store_nhwc)
      rows = jnp.where(valid, (n * h + hh) * w + ww, h_ref.shape[0] // hidden + 1)
      col = j0 + jnp.arange(chunk, dtype=jnp.int32)
      cmask = valid[:, None] if hidden_padded == hidden else valid[:, None] & (col < hidden)[None, :]
      off = rows[:, None] * hidden + col[None, :]
      plgpu.store(h_ref.at[off], hact.astype(dtype), mask=cmask)
      plgpu.store(dh_ref.at[off], dh, mask=cmask)
      db1_ref[t, pl.ds(j0, chunk)] = jnp.sum(dh32, axis=0)
    dzn = tuple(d + jnp.dot(dh, w1_ref[pl.ds(c0, wd), pl.ds(j0, chunk)].T,
                            preferred_element_type=f32)
                for d, (c0, wd) in zip(dzn, blocks))
    return dzn, ddps_acc

  dzn = tuple(jnp.zeros((tiling.pixels, wd), f32) for _, wd in blocks)
  dzn, ddps_acc = lax.fori_loop(0, hidden_padded // chunk, mlp_chunk,
                                (dzn, jnp.zeros((chunk,), f32)))
  ddps_ref[t, :] = jnp.full((16,), jnp.sum(ddps_acc) + b2_term, f32)

  # LayerNorm backward: dz = rstd * (dzhat - mean(dzhat) - zhat * mean(dzhat * zhat))
  dzhat = [d * lns_ref[pl.ds(c0, wd)][None, :] for d, (c0, wd) in zip(dzn, blocks)]
  m1 = sum(jnp.sum(d, axis=1) for d in dzhat) / c
  m2 = sum(jnp.sum(d * zb, axis=1) for d, zb in zip(dzhat, zhat)) / c
  for d, dzh, zb, (c0, wd) in zip(dzn, dzhat, zhat, blocks):
    vec_ref[t, 0, pl.ds(c0, wd)] = jnp.sum(d * zb, axis=0)
    vec_ref[t, 1, pl.ds(c0, wd)] = jnp.sum(d, axis=0)
    dzb = rstd[:, None] * (dzh - m1[:, None] - zb * m2[:, None])
    cm.store_nhwc(dz_ref, dzb, n, hh, ww, valid, c0, wd, h, w, c)


# Backward W: fc1 / fc2 weight gradients, one hidden chunk x one row range per program.
def _weight_grad_kernel(zn_ref, g_ref, dps_ref, w1_ref, b1_ref, w2_ref, gamma_ref,
                        dw1_ref, g2_ref, db1_ref,
                        *, m, hw, c, cb, chunk, rows, steps, dtype):
  blocks = _blocks(cb)
  j = pl.program_id(0)
  s = pl.program_id(1)
  j0 = pl.multiple_of(j * chunk, chunk)
  w1c = [w1_ref[pl.ds(c0, wd), pl.ds(j0, chunk)] for c0, wd in blocks]
  w2c = [w2_ref[pl.ds(j0, chunk), pl.ds(c0, wd)] for c0, wd in blocks]
  b1c = b1_ref[pl.ds(j0, chunk)]

  def step(i, carry):
    dw1, g2, db1 = carry
    r = (s * steps + i) * rows + jnp.arange(rows, dtype=jnp.int32)
    rv = r < m
    rc = jnp.where(rv, r, 0)
    scale = plgpu.load(dps_ref.at[rc // hw], mask=rv, other=0.0)
    zn, gp, gg = [], [], []
    for c0, wd in blocks:
      zn.append(cm.load_rows(zn_ref, r, rv, c0, wd, c))
      gpb = cm.load_rows(g_ref, r, rv, c0, wd, c).astype(f32) * scale[:, None]
      gp.append(gpb.astype(dtype))
      gg.append((gpb * gamma_ref[pl.ds(c0, wd)][None, :]).astype(dtype))
    hpre = b1c[None, :]
    q = jnp.zeros((rows, chunk), f32)
    for znb, ggb, w1b, w2b in zip(zn, gg, w1c, w2c):
      hpre = hpre + jnp.dot(znb, w1b, preferred_element_type=f32)
      q = q + jnp.dot(ggb, w2b.T, preferred_element_type=f32)
    hact, dgelu = cm.gelu_exact_and_grad(hpre)
    dh = q * dgelu
    dhd = dh.astype(dtype)
    hd = hact.astype(dtype)
    dw1 = tuple(a + jnp.dot(znb.T, dhd, preferred_element_type=f32) for a, znb in zip(dw1, zn))
    g2 = tuple(a + jnp.dot(hd.T, gpb, preferred_element_type=f32) for a, gpb in zip(g2, gp))
    return dw1, g2, db1 + jnp.sum(dh, axis=0)

  init = (tuple(jnp.zeros((wd, chunk), f32) for _, wd in blocks),
          tuple(jnp.zeros((chunk, wd), f32) for _, wd in blocks),
          jnp.zeros((chunk,), f32))
  dw1, g2, db1 = lax.fori_loop(0, steps, step, init)
  for a, b, (c0, wd) in zip(dw1, g2, blocks):
    dw1_ref[s, pl.ds(c0, wd), pl.ds(j0, chunk)] = a
    g2_ref[s, pl.ds(j0, chunk), pl.ds(c0, wd)] = b
  db1_ref[s, pl.ds(j0, chunk)] = db1


# Backward B: depthwise conv backward (needs dz of the neighbouring tiles: own launch).
def _dwconv_backward_kernel(x_ref, dz_ref, g_ref, dwk_ref, dx_ref, dk_ref,
                            *, h, w, c, k, tiling, width):
  t = pl.program_id(0)
  cblk = pl.program_id(1)
  n, hh, ww = _tile_coords(t, tiling)
  valid = (hh < h) & (ww < w)
  pad = k // 2
  c0 = pl.multiple_of(cblk * width, width)  # width divides c: every block is full
  dz_c = cm.load_nhwc_tap(dz_ref, n, hh, ww, valid, c0, width, h, w, c).astype(f32)
  acc = cm.load_nhwc_tap(g_ref, n, hh, ww, valid, c0, width, h, w, c).astype(f32)

  def row(dy, acc):
    for dx in range(k):
      tap = dy * k + dx
      kv = dwk_ref[tap, pl.ds(c0, width)]
      # dx(q) += dz(q - off) * k[off];  dk[off] += sum_p x(p + off) * dz(p)
      dzs = cm.load_nhwc_tap(dz_ref, n, hh - (dy - pad), ww - (dx - pad), valid, c0, width, h, w, c)
      acc = acc + dzs.astype(f32) * kv[None, :]
      xs = cm.load_nhwc_tap(x_ref, n, hh + (dy - pad), ww + (dx - pad), valid, c0, width, h, w, c)
      dk_ref[t, tap, pl.ds(c0, width)] = jnp.sum(xs.astype(f32) * dz_c, axis=0)
    return acc

  acc = lax.fori_loop(0, k, row, acc)
  dk_ref[t, k * k, pl.ds(c0, width)] = jnp.sum(dz_c, axis=0)
  cm.store_nhwc(dx_ref, acc, n, hh, ww, valid, c0, width, h, w, c)


def backward(x, params: ConvNeXtBlockParams, dps, g, *, eps, tiles: ConvNeXtTiles, interpret,
             stop_after: str | None = None):
  """Returns (dx, dparams, ddps).  ``stop_after="A"|"W"`` returns the intermediate
  outputs after that kernel instead (for per-kernel timing in benchmarks)."""
  n_, h, w, c = x.shape
  m = n_ * h * w
  k = params.dw_kernel.shape[0]
  hidden = params.fc1_kernel.shape[1]
  dtype = x.dtype
  dps = dps.astype(f32)
  g = g.astype(dtype)
  xf, gf = x.reshape(-1), g.reshape(-1)

  # --- A: recompute + MLP/LN backward per tile
  cb, chunk, hidden_padded = _matmul_blocking(c, hidden, tiles, tiles.bwd_hidden)
  tiling = cm.spatial_tiling(h, w, tiles.bwd_pixels, tiles.bwd_tile_w)
  ntiles = n_ * tiling.per_image
  p = _Prepared(params, c, cb, hidden_padded, dtype)
  gemm = tiles.wgrad == "gemm"
  kernel = functools.partial(
      _backward_tile_kernel, h=h, w=w, c=c, k=k, tiling=tiling, cb=cb, chunk=chunk,
      hidden=hidden, hidden_padded=hidden_padded, eps=eps, dtype=dtype)
  out_shape = [jax.ShapeDtypeStruct((x.size,), dtype),
               jax.ShapeDtypeStruct((x.size,), dtype),
               jax.ShapeDtypeStruct((ntiles, 3, cb.padded), f32),
               jax.ShapeDtypeStruct((ntiles, 16), f32)]
  if gemm:
    out_shape += [jax.ShapeDtypeStruct((m * hidden,), dtype),
                  jax.ShapeDtypeStruct((m * hidden,), dtype),
                  jax.ShapeDtypeStruct((ntiles, hidden_padded), f32)]
  outs = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(ntiles,),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.bwd_warps, num_stages=1),
      interpret=interpret,
      name="convnext_block_bwd_tile",
  )(xf, gf, dps, p.dwk, p.dwb, p.lns, p.lnb, p.w1, p.b1, p.w2, p.b2, p.gamma)
  dz, zn, vecs, ddps_part = outs[:4]
  vecs = jnp.sum(vecs, axis=0)[:, :c]
  d_ln_scale, d_ln_bias, sum_gp = vecs[0], vecs[1], vecs[2]
  ddps = jnp.sum(ddps_part[:, 0].reshape(n_, tiling.per_image), axis=1)

  if stop_after == "A":
    return dz, zn, d_ln_scale, ddps
  # --- W: fc1/fc2 weight gradients
  if gemm:
    # K = N*H*W reductions as XLA GEMMs over the h / dh that kernel A wrote.
    hmat, dhmat = outs[4].reshape(m, hidden), outs[5].reshape(m, hidden)
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    gp = (g.astype(f32) * dps[:, None, None, None]).astype(dtype).reshape(m, c)
    d_w1 = jnp.dot(zn.reshape(m, c).T, dhmat, preferred_element_type=f32, precision=precision)
    g2 = jnp.dot(hmat.T, gp, preferred_element_type=f32, precision=precision)
    d_b1 = jnp.sum(outs[6], axis=0)[:hidden]
  else:
    cbw, wchunk, whp = _matmul_blocking(c, hidden, tiles, tiles.wgrad_hidden)
    pw = p if (cbw, whp) == (cb, hidden_padded) else _Prepared(params, c, cbw, whp, dtype)
    nchunks = whp // wchunk
    rows = tiles.wgrad_rows
    splits = max(1, min(cm.cdiv(m, rows), tiles.wgrad_programs // nchunks))
    steps = cm.cdiv(cm.cdiv(m, rows), splits)
    splits = cm.cdiv(cm.cdiv(m, rows), steps)
    kernel = functools.partial(_weight_grad_kernel, m=m, hw=h * w, c=c, cb=cbw, chunk=wchunk,
                               rows=rows, steps=steps, dtype=dtype)
    dw1_part, g2_part, db1_part = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((splits, cbw.padded, whp), f32),
                   jax.ShapeDtypeStruct((splits, whp, cbw.padded), f32),
                   jax.ShapeDtypeStruct((splits, whp), f32)),
        grid=(nchunks, splits),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.wgrad_warps, num_stages=1),
        interpret=interpret,
        name="convnext_block_bwd_weights",
    )(zn, gf, dps, pw.w1, pw.b1, pw.w2, pw.gamma)
    d_w1 = jnp.sum(dw1_part, axis=0)[:c, :hidden]
    g2 = jnp.sum(g2_part, axis=0)[:hidden, :c]
    d_b1 = jnp.sum(db1_part, axis=0)[:hidden]
  gamma = params.gamma.astype(f32)
  w2 = params.fc2_kernel.astype(dtype).astype(f32)
  d_w2 = g2 * gamma[None, :]
  d_gamma = jnp.sum(w2 * g2, axis=0) + params.fc2_bias.astype(f32) * sum_gp
  d_b2 = gamma * sum_gp

  if stop_after == "W":
    return dz, d_w1, d_w2, d_gamma
  # --- B: depthwise conv backward
  width = min(tiles.dw_channels, c & -c)  # a power of two dividing c (>= 8 for the family)
  tiling_b = cm.spatial_tiling(h, w, tiles.dw_pixels)
  ntiles_b = n_ * tiling_b.per_image
  ncb = cm.cdiv(c, width)
  dwk = cm.pad_axis(params.dw_kernel.reshape(k * k, c).astype(f32), 1, ncb * width)
  kernel = functools.partial(_dwconv_backward_kernel, h=h, w=w, c=c, k=k, tiling=tiling_b,
                             width=width)
  dx, dk_part = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((x.size,), dtype),
                 jax.ShapeDtypeStruct((ntiles_b, k * k + 1, ncb * width), f32)),
      grid=(ntiles_b, ncb),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.dw_warps, num_stages=1),
      interpret=interpret,
      name="convnext_block_bwd_dwconv",
  )(xf, dz, gf, dwk)
  dk = jnp.sum(dk_part, axis=0)[:, :c]
  d_dw_kernel = dk[:k * k].reshape(k, k, c)
  d_dw_bias = dk[k * k]

  dparams = ConvNeXtBlockParams(
      dw_kernel=d_dw_kernel, dw_bias=d_dw_bias, ln_scale=d_ln_scale, ln_bias=d_ln_bias,
      fc1_kernel=d_w1, fc1_bias=d_b1, fc2_kernel=d_w2, fc2_bias=d_b2, gamma=d_gamma)
  dparams = jax.tree.map(lambda d, p_: d.astype(p_.dtype), dparams, params)
  return dx.reshape(x.shape), dparams, ddps
