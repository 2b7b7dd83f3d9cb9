"""Backward of ``mosaic_mlp.fused_mlp`` (the pointwise half of a block) for training.

Forward (per row r of the (M, C) activations; ``fused_mlp``'s function):

    zn = norm(z + zb)   a = zn W1 + b1   h = act(a)   y = res + rs * (h W2 + b2)

Backward, given dy:

    dh = rs * (dy W2^T)   da = dh * act'(a)   dzn = da W1^T   dz = norm'(dzn)
    hs = rs * h                                                          (``_bwd_kernel``)
    dW1 = zn^T da   db1 = sum_r da   dW2 = hs^T dy   db2 = sum_r rs dy    (XLA GEMMs)
    dres = dy   dzb = sum_r dz

(The kernels apply the row scale rs to dh's rows and to the h they store, so no XLA pass
writes rs * dy -- 0.068 ms with db2 at the 56x56x96 block, N=128, H100, now a 0.034 ms
read-only reduction for db2; applying rs in the C=96 kernel costs ~0.04 ms, and without
drop path (rs None) the kernels skip it.  When rs itself is differentiated they take
g = rs * dy instead, and h unscaled, as they once always did.)

``_bwd_kernel`` -- one CTA (one warpgroup) per 64 rows -- loads its z and g tiles once (TMA),
normalises z into a second shared-memory tile, and streams (hidden chunk x C) slices of W1^T
and W2 through a TMA pipeline, as the forward does.  Per chunk j: two wgmmas issued
back to back (a_j = zn W1_j and dh_j = g W2_j^T, 64 x C x hc each), then in registers
bias + activation and its derivative (``mosaic_mlp._activation_and_grad``: GELU' costs no
transcendental beyond those of GELU), da_j = dh_j act'(a_j); a third wgmma accumulates
dzn += da_j W1_j^T (da_j in z's dtype as its register operand; a 64 x C float32 register
accumulator kept over the whole loop) while h_j and da_j go through two shared-memory
staging slots to DRAM (TMA) for the weight gradients.  The LayerNorm backward (recomputing
mean and 1/std from the raw z tile in float32) runs in the epilogue, which writes dz once.
``_bwd_kernel_ws`` (``fused_mlp_bwd(block_m=128)``) runs 128 rows per CTA as two compute
warpgroups of 64 rows sharing each weight slice, fed by a third warpgroup that only issues
the weight TMA copies -- so that one warpgroup's wgmmas overlap the other's GELU / GELU' and
stores (one 64-row CTA per SM at C=192 leaves the tensor cores idle meanwhile).  To fit
shared memory it normalises z in place and keeps 1/std in registers for the epilogue, and
W2 may have fewer slots than W1^T (``ws_bwd_layout``).  Measured (H100, 2026-11-27, N=128,
bf16): kernel alone 0.346 vs 0.376 ms for the 64-row kernel at 28x28x192 (56x56x96
0.596-0.611 vs 0.685, both with db1 column sums, which the 128-row kernel got wrong); block
forward + backward 1.775-1.800 vs 1.867-1.876 ms at 56x56x96 and 1.070-1.085 vs
1.112-1.130 at 28x28x192 (benchmarks/RESULTS.md).  It has no db1 column sums (see its
docstring).
``_hidden_grad_kernel`` is the same without dzn, for C > 256 (``hidden_grads``; XLA then
computes dzn = da W1^T and the LayerNorm backward); ``_hidden_grad_kernel_ws``
(``hidden_grads(two_warpgroups=True)``) runs it as two compute warpgroups taking alternate
hidden chunks of the same 64 rows (H100 2026-11-27: the 14x14x384 block forward + backward
0.842 vs 0.864 ms; on in the H100 table at C=384).  So a is recomputed rather than saved
by the forward (the forward stays the inference kernel, saving only its inputs), and the
4C-wide tensors reach DRAM exactly twice (h and da, written once here, read once by the two
weight-gradient GEMMs); XLA's differentiated block writes and reads several more.

Why the weight gradients are cuBLAS GEMMs over h and da rather than reduced on chip: a
per-CTA partial dW1 / dW2 is 2 x C x 4C float32 (295 KB at C=96), which does not fit on
an SM next to the tiles above, and reducing partials across 6,000+ CTAs through DRAM would
move more bytes than h and da do.  db1 is the exception, being only E wide: with
``col_sums`` (tile field ``mosaic_bwd_db1``) each CTA writes its float32 column sums of da
(CTAs x E, 9.6 MB at the 56x56x96 block for N=128, against 308 MB of da that XLA's
separate sum reads, 0.09 ms of 2.34) and XLA adds them up (64-row CTAs only: see
``_bwd_kernel_ws``).  With ``with_zn`` (tile field ``mosaic_bwd_zn``, on) the kernels also
store the normalised z tile they compute, which the dW1 GEMM reads instead of XLA
recomputing it; with ``zn_ones`` as well (``mlp_with_grad(bwd_db1_gemm=True)``, tile field
``mosaic_bwd_db1_gemm``, on in the H100 table) that tile gets columns of ones after its C,
so the dW1 GEMM [zn | 1]^T da yields db1 as one more row: no pass over da, no cross-warp
reduction, every kernel form (H100 2026-11-27, block forward + backward: 56x56x96 1.696 vs
1.798 ms, 28x28x192 1.027 vs 1.087, 14x14x384 0.822 vs 0.837).  ``h_scales``
(``mlp_with_grad(bwd_db2_gemm=True)``, tile field ``mosaic_bwd_db2_gemm``) does the same for
db2: each row's scale after h's E columns, so the dW2 GEMM [h | s]^T g yields it.

``mlp_with_grad``: ``fused_mlp`` under a ``jax.custom_vjp`` whose backward is the above.
The row scale (drop path) is differentiated only when it is perturbed (``symbolic_zeros``),
by one extra XLA GEMM (u = h W2 + b2, d rs = sum_c dy u).

Limits: those of ``fused_mlp`` (bfloat16/float16, C a multiple of 32, E a multiple of the
hidden chunk), C at most 256, GELU or SiLU, and the tiles must fit shared memory
(``bwd_smem_bytes``; C=256 needs ``stages=1``; with 128-row CTAs ``ws_bwd_smem_bytes``);
``hidden_grads``: C and E multiples of 64, its tiles within shared memory
(``split_bwd_smem_bytes``: C=384 with 32-wide chunks, not C=768).

Measured (H100, 2026-11-26, N=128, bf16; benchmarks/RESULTS.md): the ConvNeXt block's
forward + backward 2.339 vs XLA's 3.740 ms at 56x56x96 (kernel alone 0.536 ms), 1.321 vs
2.061 at 28x28x192 (0.348), 0.975-0.995 vs 1.095 at 14x14x384 (``hidden_grads`` 0.244).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _switches, mosaic_mlp
from pallas_kernels.mosaic_mlp import (
    _WG,
    _activation_and_grad,
    _interpret_params,
    _normalise_into,
    _transforms,
    _warp_roles,
)

BLOCK_M = 64
SMEM_BYTES = 227 * 1024
BWD_ACTIVATIONS = ("gelu", "silu")


def bwd_smem_bytes(c: int, hc: int, stages: int, itemsize: int = 2, bm: int = BLOCK_M,
                   col_sums_e: int = 0) -> int:
  """Shared memory of ``_bwd_kernel``: z, zn and g tiles, ``stages`` slices of W1^T and W2,
  two staging slots each for h and da, the small vectors, plus 2 KiB for barriers (and,
  with ``col_sums_e`` = E, the CTA's float32 column sums of da)."""
  return (itemsize * (3 * bm * c + 2 * stages * hc * c + 4 * bm * hc)
          + 4 * (c + stages * hc + col_sums_e + bm) + 2048)


def unsupported_reason(m: int, c: int, e: int, dtype, act: str = "gelu",
                       hidden_chunk: int = 64, stages: int = 2,
                       col_sums: bool = False, block_m: int = BLOCK_M,
                       zn_ones: bool = False, h_scales: bool = False) -> str | None:
  """Why ``fused_mlp_bwd`` cannot run this shape/dtype/activation (with ``block_m``-row
  CTAs, and the ``zn_ones`` / ``h_scales`` tiles), or None."""
  if block_m not in (64, 128):
    return f"the backward kernel's block_m must be 64 or 128, got {block_m}"
  ones = _ones_bytes(zn_ones) + _ones_bytes(h_scales) * (block_m // 64)
  if block_m == 128:
    reason = mosaic_mlp.unsupported_reason(m, c, e, dtype, hidden_chunk) or _kernel_reason(
        "backward kernel", lambda *_: 0, c, act, hidden_chunk, stages, dtype)
    if reason is None and col_sums:
      reason = ("db1 column sums (col_sums) are not available with 128-row CTAs (two "
                "warpgroups' cross-warp reductions would share one scratch buffer); use "
                "block_m=64 or col_sums=False")
    if reason is None and ws_bwd_layout(c, e, hidden_chunk, stages,
                                        jnp.dtype(dtype).itemsize, ones) is None:
      need = ws_bwd_smem_bytes(c, e, hidden_chunk, stages, 1, 1,
                               jnp.dtype(dtype).itemsize) + ones
      reason = (f"C={c} with a hidden chunk of {hidden_chunk} and {stages} weight stages needs "
                f"{need} bytes of shared memory in the 128-row backward kernel (at most "
                f"{SMEM_BYTES}); use fewer stages, a smaller chunk or block_m=64")
    return reason
  smem = lambda *a: bwd_smem_bytes(*a, col_sums_e=e if col_sums else 0) + ones
  return (mosaic_mlp.unsupported_reason(m, c, e, dtype, hidden_chunk)
          or _kernel_reason("backward kernel", smem, c, act, hidden_chunk, stages, dtype))


def zn_ones_cols(c: int, itemsize: int = 2, split: bool = False) -> int:
  """How many columns of ones ``zn_ones`` appends to zn (M, C): one swizzle tile of the zn
  tiles (32 at C=96, 64 at C=192 / 384 in bf16).  Why not one column: the TMA copies of
  swizzled tiles need every row of the DRAM array to be whole tiles (Mosaic GPU tiles the
  DRAM array as it tiles shared memory).  XLA's dW1 GEMM then has C + that many rows, all
  but row C of the extra ones redundant copies of db1; the GEMM is DRAM-bound here (it reads
  the 4C-wide da), so they cost little next to the pass over da they replace."""
  from pallas_kernels.mosaic_split import _column_block
  minor = _column_block(c) if split else c
  return mosaic_mlp._swizzle_bytes(minor, itemsize) // itemsize


def _ones_bytes(zn_ones: bool) -> int:
  """Shared memory of the ones tile ``zn_ones`` stores (0 without it): 64 rows of 32 bytes
  (the narrowest swizzle) for every width, copied out zn_ones_cols / its width times per
  64 rows."""
  return 64 * 32 if zn_ones else 0


def _ones_tiles(dtype, n: int | None = None):
  """A 64-row tile of 32-byte rows (``n`` of them), for ``zn_ones`` / ``h_scales``."""
  w = 32 // jnp.dtype(dtype).itemsize
  return plgpu.SMEM((64, w) if n is None else (n, 64, w), dtype,
                    transforms=_transforms(w, dtype))


def _store_ones(ones_smem, zn_gmem, row_blocks, c: int):
  """``zn_ones``: fills the 64-row tile ``ones_smem`` with ones and TMA-copies it into
  zn_gmem's columns C .. end for each 64-row slice in ``row_blocks``; awaited with the
  kernel's other stores."""
  w = ones_smem.shape[1]
  ones_smem[...] = plgpu.layout_cast(jnp.ones((64, w), ones_smem.dtype), plgpu.Layout.WGMMA)
  plgpu.commit_smem()
  for rows in row_blocks:
    for col in range(c, zn_gmem.shape[1], w):
      plgpu.copy_smem_to_gmem(ones_smem, zn_gmem.at[rows, pl.ds(col, w)])


def _store_zn_blocks(z_smem, zn_gmem, rows, ones_smem=None):
  """The split kernels' normalised tile (``z_smem``: (n_cb, rows, cb) column blocks) to
  zn_gmem's first C columns, and with ``ones_smem`` (``zn_ones``) the ones after them."""
  n_cb, _, cb = z_smem.shape
  for b in range(n_cb):
    plgpu.copy_smem_to_gmem(z_smem.at[b], zn_gmem.at[rows, pl.ds(b * cb, cb)])
  if ones_smem is not None:
    _store_ones(ones_smem, zn_gmem, [rows], n_cb * cb)


def h_scales_cols(hc: int, itemsize: int = 2) -> int:
  """How many columns ``h_scales`` appends to h (M, E): one swizzle tile of the h staging
  tiles (64 for 64-wide hidden chunks in bf16, 32 for 32-wide), for the reason
  ``zn_ones_cols`` gives."""
  return mosaic_mlp._swizzle_bytes(hc, itemsize) // itemsize


def _store_scales(scales_smem, rs_smem, h_gmem, rows, e: int):
  """``h_scales``: fills the 64-row tile ``scales_smem`` with the rows' scales (ones where
  ``rs_smem`` is None) and TMA-copies it into h_gmem's columns E .. end of ``rows``, so
  that XLA's dW2 GEMM [h | rs]^T g yields db2 = sum_r rs_r g_r as its row E; awaited with
  the kernel's other stores."""
  w = scales_smem.shape[1]
  if rs_smem is None:
    vals = plgpu.layout_cast(jnp.ones((64, w), jnp.float32), plgpu.Layout.WGMMA)
  else:
    vals = lax.broadcast_in_dim(plgpu.load(rs_smem, layout=_WG.reduce(1)), (64, w), [0])
  scales_smem[...] = vals.astype(scales_smem.dtype)
  plgpu.commit_smem()
  for col in range(e, h_gmem.shape[1], w):
    plgpu.copy_smem_to_gmem(scales_smem, h_gmem.at[rows, pl.ds(col, w)])


def _kernel_reason(kernel: str, smem_bytes, c: int, act: str, hidden_chunk: int,
                   stages: int, dtype) -> str | None:
  """The checks both backward kernels share: activation, stages, shared memory."""
  if act not in BWD_ACTIVATIONS:
    return f"the backward kernel supports the activations {BWD_ACTIVATIONS}, got {act!r}"
  if stages < 1:
    return f"stages must be >= 1, got {stages}"
  need = smem_bytes(c, hidden_chunk, stages, jnp.dtype(dtype).itemsize)
  if need > SMEM_BYTES:
    return (f"C={c} with a hidden chunk of {hidden_chunk} and {stages} weight stages needs "
            f"{need} bytes of shared memory in the {kernel} (at most {SMEM_BYTES}); "
            f"use fewer stages or a smaller chunk")
  return None


def _ln_backward(dzn, z_smem, zb_smem, *, normalize: bool, eps: float):
  """dz from dzn (both (rows, C) float32, WGMMA layout) through zn = norm(z + zb): with
  zhat = (z + zb - mean) / std, dz = (dzn - mean(dzn) - zhat mean(dzn zhat)) / std."""
  if not normalize:
    return dzn
  rows, c = dzn.shape
  z = plgpu.load(z_smem, layout=_WG).astype(jnp.float32)
  zb = plgpu.load(zb_smem, layout=_WG.reduce(0))
  z = z + lax.broadcast_in_dim(zb, (rows, c), [1])
  row = lambda v: lax.broadcast_in_dim(v, (rows, c), [0])
  mean = z.sum(axis=1) * (1.0 / c)
  d = z - row(mean)
  rstd = lax.rsqrt((d * d).sum(axis=1) * (1.0 / c) + eps)
  zhat = d * row(rstd)
  m1 = dzn.sum(axis=1) * (1.0 / c)
  m2 = (dzn * zhat).sum(axis=1) * (1.0 / c)
  return (dzn - row(m1) - zhat * row(m2)) * row(rstd)


def _chunk_matmuls(zn_smem, g_smem, w1t_smem, w2_smem, hc: int):
  """(a, dh) of one hidden chunk, float32 (rows, hc) registers: a = zn W1_j and dh = g W2_j^T
  as wgmmas issued back to back and awaited.  The split form's tiles and weight slices come
  in column blocks ((n_cb, rows, cb) and (n_cb, hc, cb)): one wgmma per block."""
  blocks = range(zn_smem.shape[0]) if len(zn_smem.shape) == 3 else [None]
  at = lambda ref, b: ref if b is None else ref.at[b]
  rows = zn_smem.shape[-2]

  def matmuls(acc_a, acc_dh):
    for b in blocks:
      plgpu.wgmma(acc_a, at(zn_smem, b), at(w1t_smem, b).transpose((1, 0)))
    for b in blocks:
      plgpu.wgmma(acc_dh, at(g_smem, b), at(w2_smem, b).transpose((1, 0)))
    plgpu.wgmma_wait(0)
    return acc_a[...], acc_dh[...]

  return pl.run_scoped(matmuls, plgpu.ACC((rows, hc), jnp.float32),
                       plgpu.ACC((rows, hc), jnp.float32))


def _hidden_grad(a, dh, b1_smem, rs_smem, act: str):
  """(rs h, da) of one hidden chunk, float32 registers: h = act(a + b1) and
  da = rs dh act'(a + b1), with rs the CTA's row scales (``rs_smem``, (rows,) float32; None:
  no scaling) and dh = g W2^T: dW2 = (rs h)^T g and db1, dW1, dz follow from da."""
  rows, hc = a.shape
  b1 = plgpu.load(b1_smem, layout=_WG.reduce(0))
  h, dact = _activation_and_grad(a + lax.broadcast_in_dim(b1, (rows, hc), [1]), act)
  if rs_smem is None:
    return h, dh * dact
  rs = lax.broadcast_in_dim(plgpu.load(rs_smem, layout=_WG.reduce(1)), (rows, hc), [0])
  return h * rs, (dh * rs) * dact


def _store_hidden(h, da, out_smem, j, rows, h_gmem, da_gmem, before_store=None,
                  db1_smem=None, slots: int = 2):
  """Writes chunk j's h and da (z's dtype) into staging slot j % slots of ``out_smem``
  (slots, 2, rows, hc) and TMA-copies them to columns [j hc, (j + 1) hc) of h_gmem /
  da_gmem.  The stores issued for chunk j - slots must have read the slot first (with two
  slots those of chunk j - 1 may still be in flight).  ``before_store(da_slot)`` runs after
  the slots are committed and before the copies are issued (the fused kernel's dzn wgmma).
  ``db1_smem`` (E / hc, hc) float32: row j gets the chunk's column sums of da (float32,
  before rounding)."""
  hc = h.shape[1]
  slot = lax.rem(j, slots)
  plgpu.wait_smem_to_gmem(2 * (slots - 1), wait_read_only=True)  # 2 stores per chunk
  h_slot, da_slot = out_smem.at[slot, 0], out_smem.at[slot, 1]
  h_slot[...] = h.astype(h_slot.dtype)
  da_slot[...] = da.astype(da_slot.dtype)
  if db1_smem is not None:
    db1_smem[j] = da.sum(axis=0)
  plgpu.commit_smem()
  if before_store is not None:
    before_store(da_slot)
  cols = pl.ds(j * hc, hc)
  plgpu.copy_smem_to_gmem(h_slot, h_gmem.at[rows, cols])
  plgpu.copy_smem_to_gmem(da_slot, da_gmem.at[rows, cols])


def _bwd_kernel(z_gmem, g_gmem, rs_gmem, zb_gmem, w1t_gmem, b1_gmem, w2_gmem, dz_gmem, h_gmem,
                da_gmem,
                *extra_gmem, c: int, e: int, hc: int, act: str, normalize: bool, eps: float,
                stages: int, bm: int, da_in_regs: bool, with_zn: bool = False,
                zn_ones: bool = False, h_scales: bool = False):
  """``extra_gmem``: with ``with_zn``, first zn (M, C), the normalised tile the kernel
  computes anyway, for XLA's dW1 GEMM (with ``zn_ones``: (M, C + zn_ones_cols), ones after
  column C); then (optional) db1_gmem, (CTAs, E / hc, hc) float32, each CTA's column sums
  of da.  ``h_scales``: h_gmem is (M, E + h_scales_cols), the row scales after column E."""
  zn_gmem, db1_gmem = _optional_refs(extra_gmem, with_zn)
  dtype = z_gmem.dtype
  cta = lax.axis_index("m")
  rows = pl.ds(cta * bm, bm)
  tile_t = _transforms(c, dtype)

  def scoped(z_smem, zn_smem, g_smem, rs_smem, zb_smem, out_smem, bars, *db1_smem,
             ones_smem=None, scales_smem=None):
    db1_smem = db1_smem[0] if db1_smem else None
    plgpu.copy_gmem_to_smem(z_gmem.at[rows], z_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(g_gmem.at[rows], g_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(zb_gmem, zb_smem, bars.at[2])
    if rs_gmem is None:
      rs_smem = None
    else:
      plgpu.copy_gmem_to_smem(rs_gmem.at[rows], rs_smem, bars.at[3])
      plgpu.barrier_wait(bars.at[3])
    plgpu.barrier_wait(bars.at[0])
    plgpu.barrier_wait(bars.at[2])
    _normalise_into(z_smem, zb_smem, zn_smem, normalize=normalize, eps=eps)
    if zn_gmem is not None:  # read-only from here on; awaited with the h / da stores
      plgpu.copy_smem_to_gmem(zn_smem, zn_gmem.at[rows, pl.ds(0, c)])
      if zn_ones:
        _store_ones(ones_smem, zn_gmem, [rows], c)
    if h_scales:
      _store_scales(scales_smem, rs_smem, h_gmem, rows, e)
    plgpu.barrier_wait(bars.at[1])

    def accumulate(dzn_ref):
      def chunk(idx, w1t_smem, b1_smem, w2_smem):
        (j,) = idx

        a, dh = _chunk_matmuls(zn_smem, g_smem, w1t_smem, w2_smem, hc)
        h, da = _hidden_grad(a, dh, b1_smem, rs_smem, act)

        # dzn += da W1_j^T: da as wgmma's register operand on a GPU (from shared memory,
        # a 96-wide C failed Mosaic's layout inference, jax 0.11.2), through its staging
        # slot in the interpreter (which does not model register operands).  The wgmma
        # that read a slot is retired at the end of its chunk, before the slot is reused.
        def project_back(da_slot):
          plgpu.wgmma(dzn_ref, da.astype(dtype) if da_in_regs else da_slot, w1t_smem)

        _store_hidden(h, da, out_smem, j, rows, h_gmem, da_gmem, project_back, db1_smem)
        plgpu.wgmma_wait(0)  # the weight slots are refilled once the chunk returns

      w_t = _transforms(c, dtype)
      plgpu.emit_pipeline(
          chunk,
          grid=(e // hc,),
          in_specs=[
              plgpu.BlockSpec((hc, c), lambda j: (j, 0), transforms=w_t),
              plgpu.BlockSpec((hc,), lambda j: (j,)),
              plgpu.BlockSpec((hc, c), lambda j: (j, 0), transforms=w_t),
          ],
          max_concurrent_steps=stages,
      )(w1t_gmem, b1_gmem, w2_gmem)
      return dzn_ref[...]

    dzn = pl.run_scoped(accumulate, plgpu.ACC((bm, c), jnp.float32))
    dz = _ln_backward(dzn, z_smem, zb_smem, normalize=normalize, eps=eps)
    g_smem[...] = dz.astype(dtype)  # every wgmma that read g has been retired
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(g_smem, dz_gmem.at[rows])
    if db1_smem is not None:
      plgpu.copy_smem_to_gmem(db1_smem, db1_gmem[0].at[cta])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(
      scoped,
      plgpu.SMEM((bm, c), dtype, transforms=tile_t),
      plgpu.SMEM((bm, c), dtype, transforms=tile_t),
      plgpu.SMEM((bm, c), dtype, transforms=tile_t),
      plgpu.SMEM((bm,), jnp.float32),
      plgpu.SMEM((c,), jnp.float32),
      plgpu.SMEM((2, 2, bm, hc), dtype, transforms=_transforms(hc, dtype)),
      plgpu.Barrier(num_barriers=4),
      *([plgpu.SMEM((e // hc, hc), jnp.float32)] if db1_gmem else []),
      **({"ones_smem": _ones_tiles(dtype)} if zn_ones else {}),
      **({"scales_smem": _ones_tiles(dtype)} if h_scales else {}),
  )


def ws_bwd_smem_bytes(c: int, e: int, hc: int, stages: int, w2_stages: int, slots: int,
                      itemsize: int = 2) -> int:
  """Shared memory of ``_bwd_kernel_ws`` (128-row CTAs): per compute warpgroup a z tile
  (normalised in place) and a g tile of 64 rows, ``slots`` staging slots each for h and da;
  ``stages`` slices of W1^T and ``w2_stages`` of W2; z_bias, all of b1, the row scales,
  plus 2 KiB for barriers."""
  return (itemsize * (2 * (2 * 64 * c + slots * 2 * 64 * hc) + (stages + w2_stages) * hc * c)
          + 4 * (c + e + 128) + 2048)


def ws_bwd_layout(c: int, e: int, hc: int, stages: int,
                  itemsize: int = 2, extra_bytes: int = 0) -> tuple[int, int] | None:
  """(W2 stages, staging slots) of ``_bwd_kernel_ws`` for ``stages`` slices of W1^T: the
  first of (stages, 2), (stages, 1), (1, 2), (1, 1) that fits shared memory, or None.  At
  C=192 (hc=64, bf16) with 2 W1 stages that is (1, 1): 211,200 bytes; (2, 1) would need
  235,776 of the 232,448.  ``extra_bytes``: more shared memory the kernel needs (the
  ``zn_ones`` tile)."""
  for w2_stages, slots in ((stages, 2), (stages, 1), (1, 2), (1, 1)):
    if ws_bwd_smem_bytes(c, e, hc, stages, w2_stages, slots, itemsize) + extra_bytes <= SMEM_BYTES:
      return w2_stages, slots
  return None


def _normalise_in_place_rstd(z_smem, zb_smem, *, normalize: bool, eps: float):
  """z_smem <- LN(z + zb) (or z + zb) in place, fenced for the tensor cores; returns the
  rows' 1/std (float32 registers, WGMMA row layout) for the LayerNorm backward (None
  without ``normalize``)."""
  rows, c = z_smem.shape
  z = plgpu.load(z_smem, layout=_WG).astype(jnp.float32)
  zb = plgpu.load(zb_smem, layout=_WG.reduce(0))
  z = z + lax.broadcast_in_dim(zb, (rows, c), [1])
  rstd = None
  if normalize:
    mean = z.sum(axis=1) * (1.0 / c)
    d = z - lax.broadcast_in_dim(mean, (rows, c), [0])
    rstd = lax.rsqrt((d * d).sum(axis=1) * (1.0 / c) + eps)
    z = d * lax.broadcast_in_dim(rstd, (rows, c), [0])
  z_smem[...] = z.astype(z_smem.dtype)
  plgpu.commit_smem()
  return rstd


def _ln_backward_from_zn(dzn, zn_smem, rstd):
  """dz from dzn through zn = norm(z + zb), given the normalised tile (in z's dtype) and the
  rows' 1/std: dz = (dzn - mean(dzn) - zn mean(dzn zn)) / std.  (zn rounded to bf16 stands
  in for the exact zhat: ~2e-3 relative on the last term.)  rstd None: the identity."""
  if rstd is None:
    return dzn
  rows, c = dzn.shape
  zhat = plgpu.load(zn_smem, layout=_WG).astype(jnp.float32)
  row = lambda v: lax.broadcast_in_dim(v, (rows, c), [0])
  m1 = dzn.sum(axis=1) * (1.0 / c)
  m2 = (dzn * zhat).sum(axis=1) * (1.0 / c)
  return (dzn - row(m1) - zhat * row(m2)) * row(rstd)


def _bwd_kernel_ws(z_gmem, g_gmem, rs_gmem, zb_gmem, w1t_gmem, b1_gmem, w2_gmem, dz_gmem,
                   h_gmem, da_gmem, *extra_gmem, c: int, e: int, hc: int, act: str,
                   normalize: bool, eps: float, stages: int, w2_stages: int, slots: int,
                   da_in_regs: bool, with_zn: bool = False, zn_ones: bool = False,
                   h_scales: bool = False):
  """``_bwd_kernel`` with 128 rows per CTA, warp-specialised (as the forward's
  ``mosaic_mlp._kernel_ws``): warpgroups 0 and 1 each own 64 rows and run the same per-chunk
  wgmma -> GELU / GELU' -> wgmma chain; warpgroup 2 only issues the TMA copies of the weight
  slices, W1^T into ``stages`` slots and W2 into ``w2_stages``, refilling a W2 slot as soon
  as both compute warpgroups' dh wgmmas have read it and a W1^T slot after their dzn
  wgmmas.  Why: with one 64-row warpgroup per CTA and one CTA per SM (C=192), the tensor
  cores idle while the activation, its derivative and the h / da stores run; two compute
  warpgroups let one's wgmmas overlap the other's register work, and each weight slice is
  read from L2 once per 128 rows.  To fit, each warpgroup normalises its z tile in place and
  keeps only the rows' 1/std (registers) for the LayerNorm backward, which then uses the
  rounded zn (``_ln_backward_from_zn``); ``slots`` (1 or 2) staging slots per warpgroup.
  ``extra_gmem``: zn_gmem with ``with_zn`` (and ``zn_ones``, as ``_bwd_kernel``'s; warpgroup
  0 writes both warpgroups' ones from one tile; ``h_scales``: each its rows' scales).  No db1 column sums: a reduction over rows
  crosses the warps of a warpgroup, and Mosaic GPU (jax 0.11.2) gives every warpgroup the
  same shared-memory scratch for it -- the two compute warpgroups' sums raced (wrong
  results on an H100, 2026-11-27; right in the interpreter, which runs them one after the
  other)."""
  zn_gmem = extra_gmem[0] if with_zn else None
  dtype = z_gmem.dtype
  n_chunks = e // hc
  cta = lax.axis_index("m")

  def body(zn_smem, g_smem, rs_smem, zb_smem, b1_smem, w1t_smem, w2_smem, out_smem, tile_bars,
           param_bars, w1_bars, w2_bars, w1_free, w2_free, ones_smem=None, scales_smem=None):
    def _compute(wgi):
      rows = pl.ds(cta * 128 + wgi * 64, 64)
      my_zn, my_g, my_out = zn_smem.at[wgi], g_smem.at[wgi], out_smem.at[wgi]
      plgpu.copy_gmem_to_smem(z_gmem.at[rows], my_zn, tile_bars.at[3 * wgi])
      plgpu.copy_gmem_to_smem(g_gmem.at[rows], my_g, tile_bars.at[3 * wgi + 1])
      if rs_gmem is None:
        my_rs = None
      else:
        my_rs = rs_smem.at[wgi]
        plgpu.copy_gmem_to_smem(rs_gmem.at[rows], my_rs, tile_bars.at[3 * wgi + 2])
        plgpu.barrier_wait(tile_bars.at[3 * wgi + 2])
      plgpu.barrier_wait(tile_bars.at[3 * wgi])
      plgpu.barrier_wait(param_bars.at[0])
      rstd = _normalise_in_place_rstd(my_zn, zb_smem, normalize=normalize, eps=eps)
      if zn_gmem is not None:  # read-only from here on; awaited with the h / da stores
        plgpu.copy_smem_to_gmem(my_zn, zn_gmem.at[rows, pl.ds(0, c)])
        if zn_ones:
          @pl.when(wgi == 0)
          def _ones():
            _store_ones(ones_smem, zn_gmem,
                        [pl.ds(cta * 128 + w * 64, 64) for w in range(2)], c)
      if h_scales:
        _store_scales(scales_smem.at[wgi], my_rs, h_gmem, rows, e)
      plgpu.barrier_wait(tile_bars.at[3 * wgi + 1])
      plgpu.barrier_wait(param_bars.at[1])

      def accumulate(dzn_ref):
        @pl.loop(0, n_chunks)
        def _chunk(j):
          s1, s2 = lax.rem(j, stages), lax.rem(j, w2_stages)
          w1t = w1t_smem.at[s1]
          plgpu.barrier_wait(w1_bars.at[s1])
          plgpu.barrier_wait(w2_bars.at[s2])

          a, dh = _chunk_matmuls(my_zn, my_g, w1t, w2_smem.at[s2], hc)
          plgpu.barrier_arrive(w2_free.at[s2])
          h, da = _hidden_grad(a, dh, b1_smem.at[j], my_rs, act)

          def project_back(da_slot):  # as _bwd_kernel's
            plgpu.wgmma(dzn_ref, da.astype(dtype) if da_in_regs else da_slot, w1t)

          _store_hidden(h, da, my_out, j, rows, h_gmem, da_gmem, project_back, slots=slots)
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(w1_free.at[s1])
        return dzn_ref[...]

      dzn = pl.run_scoped(accumulate, plgpu.ACC((64, c), jnp.float32))
      dz = _ln_backward_from_zn(dzn, my_zn, rstd)
      my_g[...] = dz.astype(dtype)  # every wgmma that read g has been retired
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my_g, dz_gmem.at[rows])
      plgpu.wait_smem_to_gmem(0)

    def _memory():
      plgpu.copy_gmem_to_smem(zb_gmem, zb_smem, param_bars.at[0])
      plgpu.copy_gmem_to_smem(b1_gmem, b1_smem, param_bars.at[1])

      def issue(j, w_gmem, w_smem, bars, free, n_slots):
        # Chunk j into slot j % n_slots, once both compute warpgroups released chunk
        # j - n_slots from it.
        slot = lax.rem(j, n_slots)

        @pl.when(j >= n_slots)
        def _():
          plgpu.barrier_wait(free.at[slot])
        plgpu.copy_gmem_to_smem(w_gmem.at[pl.ds(j * hc, hc)], w_smem.at[slot], bars.at[slot])

      @pl.loop(0, n_chunks)
      def _load(j):
        issue(j, w1t_gmem, w1t_smem, w1_bars, w1_free, stages)
        issue(j, w2_gmem, w2_smem, w2_bars, w2_free, w2_stages)

      # Observe the last chunks' releases too, so that every barrier phase is drained before
      # the barriers are freed.
      for free, n_slots in ((w1_free, stages), (w2_free, w2_stages)):
        for j in range(max(n_chunks - n_slots, 0), n_chunks):
          plgpu.barrier_wait(free.at[j % n_slots])

    _warp_roles(_compute, _memory)

  w_t = _transforms(c, dtype)
  pl.run_scoped(
      body,
      plgpu.SMEM((2, 64, c), dtype, transforms=w_t),
      plgpu.SMEM((2, 64, c), dtype, transforms=w_t),
      plgpu.SMEM((2, 64), jnp.float32),
      plgpu.SMEM((c,), jnp.float32),
      plgpu.SMEM((n_chunks, hc), jnp.float32),
      plgpu.SMEM((stages, hc, c), dtype, transforms=w_t),
      plgpu.SMEM((w2_stages, hc, c), dtype, transforms=w_t),
      plgpu.SMEM((2, slots, 2, 64, hc), dtype, transforms=_transforms(hc, dtype)),
      plgpu.Barrier(num_barriers=6),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=w2_stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=w2_stages),
      **({"ones_smem": _ones_tiles(dtype)} if zn_ones else {}),
      **({"scales_smem": _ones_tiles(dtype, 2)} if h_scales else {}),
      collective_axes="wg",
  )


def _rs_optional(kernel, has_rs: bool):
  """``kernel`` (whose third argument is rs_gmem) for calls without a row-scale input when
  ``has_rs`` is False: rs_gmem is then None and the kernel skips the scaling."""
  if has_rs:
    return kernel
  return lambda z_gmem, g_gmem, *refs: kernel(z_gmem, g_gmem, None, *refs)


def _check_bwd_args(z, g, w1, b1, w2) -> tuple[int, int, int]:
  """(M, C, E) of a backward call, after checking the shapes fit together."""
  m, c = z.shape
  e = w1.shape[1]
  if g.shape != z.shape or g.dtype != z.dtype:
    raise ValueError(f"g must match z: got {g.shape} {g.dtype} vs {z.shape} {z.dtype}")
  if w1.shape != (c, e) or w2.shape != (e, c) or b1.shape != (e,):
    raise ValueError(f"weight shapes do not fit C={c}, E={e}: w1 {w1.shape}, b1 {b1.shape}, "
                     f"w2 {w2.shape}")
  return m, c, e


def _bwd_inputs(z, g, z_bias, row_scale, block_m: int = BLOCK_M):
  """(zb, z, g, rs, M padded): z_bias as float32 (zeros when None), row_scale as float32
  (None stays None: the kernels then skip the scaling), z, g and rs with zero rows up to a
  multiple of ``block_m`` (g = 0 there gives da = 0 and dz = 0; callers slice them off)."""
  m, c = z.shape
  zb = jnp.zeros((c,), jnp.float32) if z_bias is None else z_bias.astype(jnp.float32)
  rs = None if row_scale is None else row_scale.astype(jnp.float32)
  if rs is not None and rs.shape != (m,):
    raise ValueError(f"row_scale must have shape ({m},) (one per row of z), got {rs.shape}")
  m_pad = -(-m // block_m) * block_m
  if m_pad != m:
    z = jnp.pad(z, ((0, m_pad - m), (0, 0)))
    g = jnp.pad(g, ((0, m_pad - m), (0, 0)))
    rs = None if rs is None else jnp.pad(rs, (0, m_pad - m))
  return zb, z, g, rs, m_pad


@_switches.jit(static_argnames=("act", "normalize", "eps", "hidden_chunk",
                                "stages", "col_sums", "with_zn", "zn_ones",
                                "h_scales", "block_m", "w2_stages",
                                "staging_slots", "interpret"))
def fused_mlp_bwd(z, g, w1, b1, w2, *, z_bias=None, row_scale=None, act: str = "gelu",
                  normalize: bool = True,
                  eps: float = 1e-6, hidden_chunk: int = 64, stages: int = 2,
                  col_sums: bool = False, with_zn: bool = False, zn_ones: bool = False,
                  h_scales: bool = False, block_m: int = BLOCK_M, w2_stages: int | None = None,
                  staging_slots: int | None = None, interpret: bool = False):
  """(dz, h, da) of ``fused_mlp`` for the output cotangent g and row scale rs.

  z, g: (M, C) bfloat16/float16; w1: (C, E); b1: (E,); w2: (E, C); z_bias: (C,) or None;
  row_scale: (M,) or None (ones).  Returns dz (M, C) (the gradient with respect to z, and
  summed over rows, z_bias), and the row-scaled activation h = rs act(a) and the gradient
  da = rs (g W2^T) act'(a), both (M, E), in z's dtype, for the weight gradients
  dW1 = norm(z + zb)^T da and dW2 = h^T g.  Pass either g = dy with ``row_scale`` (the scale
  applied on chip; ``mlp_with_grad`` does this, saving a pass that writes rs * dy) or
  g = rs * dy without it (h is then act(a) itself).  ``with_zn=True`` adds
  a result after da: zn = norm(z + zb) (M, C) in z's dtype, the tile the kernel normalises
  anyway (one TMA store; XLA would otherwise recompute it in two passes over z for dW1);
  with ``zn_ones=True`` it is (M, C + ``zn_ones_cols(C)``), ones after column C, so the dW1 GEMM
  [zn | 1]^T da gives db1 as its row C (``mlp_with_grad(bwd_db1_gemm=True)``).
  ``h_scales=True``: h is (M, E + ``h_scales_cols(hidden_chunk)``), each row's scale (1
  without ``row_scale``) after column E, so the dW2 GEMM [h | rs]^T g gives db2 as its row
  E (``mlp_with_grad(bwd_db2_gemm=True)``).
  ``col_sums=True`` adds one more, db1 = da summed over rows (E,) float32, from per-CTA
  column sums the kernel writes (float32 da before rounding) instead of a pass over da.
  ``block_m=128``: two compute warpgroups of 64 rows per CTA fed by a TMA warpgroup
  (``_bwd_kernel_ws``), with ``stages`` W1^T slots, ``w2_stages`` W2 slots and
  ``staging_slots`` h / da staging slots per warpgroup (None: ``ws_bwd_layout``'s choice).
  Raises NotImplementedError naming the reason for unsupported shapes
  (``unsupported_reason``)."""
  m, c, e = _check_bwd_args(z, g, w1, b1, w2)
  _check_zn_ones("fused_mlp_bwd", zn_ones, with_zn, col_sums)
  reason = unsupported_reason(m, c, e, z.dtype, act, hidden_chunk, stages, col_sums, block_m,
                              zn_ones, h_scales)
  if reason is not None:
    raise NotImplementedError(f"fused_mlp_bwd: {reason}")
  dtype = z.dtype
  zb, z, g, rs, m_pad = _bwd_inputs(z, g, z_bias, row_scale, block_m)
  da_in_regs = interpret is False or interpret is None
  ones = _ones_bytes(zn_ones) + 2 * _ones_bytes(h_scales)
  if block_m == 128:
    auto_w2, auto_slots = ws_bwd_layout(c, e, hidden_chunk, stages, jnp.dtype(dtype).itemsize,
                                        ones)
    w2_stages, staging_slots = w2_stages or auto_w2, staging_slots or auto_slots
    if staging_slots not in (1, 2) or w2_stages < 1:
      raise ValueError(f"staging_slots must be 1 or 2 and w2_stages >= 1, got "
                       f"{staging_slots} and {w2_stages}")
    need = ws_bwd_smem_bytes(c, e, hidden_chunk, stages, w2_stages, staging_slots,
                             jnp.dtype(dtype).itemsize) + ones
    if need > SMEM_BYTES:
      raise NotImplementedError(
          f"fused_mlp_bwd: C={c} with {stages} W1 stages, {w2_stages} W2 stages and "
          f"{staging_slots} staging slots needs {need} bytes of shared memory in the 128-row "
          f"backward kernel (at most {SMEM_BYTES})")
    kernel = functools.partial(
        _bwd_kernel_ws, c=c, e=e, hc=hidden_chunk, act=act, normalize=normalize,
        eps=float(eps), stages=stages, w2_stages=w2_stages, slots=staging_slots,
        da_in_regs=da_in_regs, with_zn=with_zn, zn_ones=zn_ones, h_scales=h_scales)
    threads = dict(num_threads=3, thread_name="wg")
    b1_arg = b1.astype(jnp.float32).reshape(e // hidden_chunk, hidden_chunk)
  else:
    kernel = functools.partial(
        _bwd_kernel, c=c, e=e, hc=hidden_chunk, act=act, normalize=normalize, eps=float(eps),
        stages=stages, bm=BLOCK_M, da_in_regs=da_in_regs, with_zn=with_zn, zn_ones=zn_ones,
        h_scales=h_scales)
    threads = {}
    b1_arg = b1.astype(jnp.float32)
  kernel = _rs_optional(kernel, rs is not None)
  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((m_pad, c), dtype),
                jax.ShapeDtypeStruct((m_pad, _h_width(e, hidden_chunk, dtype, h_scales)), dtype),
                jax.ShapeDtypeStruct((m_pad, e), dtype),
                *_optional_types(m_pad, c, e, hidden_chunk, dtype, with_zn, col_sums, zn_ones)),
      grid=(m_pad // block_m,),
      grid_names=("m",),
      **threads,
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret),
  )
  dz, h, da, *rest = call(z, g, *([] if rs is None else [rs]), zb, w1.T.astype(dtype),
                          b1_arg, w2.astype(dtype))
  return _trim_results(m, m_pad, e, [dz, h, da], rest, with_zn, col_sums)


def _h_width(e: int, hc: int, dtype, h_scales: bool) -> int:
  return e + (h_scales_cols(hc, jnp.dtype(dtype).itemsize) if h_scales else 0)


def _check_zn_ones(fn: str, zn_ones: bool, with_zn: bool, col_sums: bool):
  if zn_ones and not with_zn:
    raise ValueError(f"{fn}: zn_ones=True extends the zn result: it needs with_zn=True")
  if zn_ones and col_sums:
    raise ValueError(f"{fn}: zn_ones and col_sums are two ways to db1; ask for one")


def _trim_results(m, m_pad, e, rows_out, rest, with_zn, col_sums):
  """The backward kernels' results without the padding rows: ``rows_out`` (+ zn) and, with
  ``col_sums``, db1 summed over the CTAs (padded rows have g = 0, hence da = 0: they add
  nothing to it)."""
  out = list(rows_out) + (rest[:1] if with_zn else [])
  if m_pad != m:
    out = [v[:m] for v in out]
  return tuple(out) + ((_sum_col_sums(rest[-1], e),) if col_sums else ())


def _optional_types(m_pad: int, c: int, e: int, hc: int, dtype, with_zn: bool,
                    col_sums: bool, zn_ones: bool = False, split: bool = False) -> list:
  """The backward kernels' optional outputs, in order: zn (M, C) in z's dtype ((M, C +
  zn_ones_cols) with ``zn_ones``), then the per-CTA column sums of da, (CTAs, E / hc, hc)
  float32."""
  zn_cols = c + (zn_ones_cols(c, jnp.dtype(dtype).itemsize, split) if zn_ones else 0)
  return ([jax.ShapeDtypeStruct((m_pad, zn_cols), dtype)] if with_zn else []) + (
      [jax.ShapeDtypeStruct((m_pad // BLOCK_M, e // hc, hc), jnp.float32)] if col_sums else [])


def _optional_refs(extra_gmem, with_zn: bool):
  """(zn_gmem or None, (db1_gmem,) or ()) from a kernel's optional outputs."""
  return (extra_gmem[0], extra_gmem[1:]) if with_zn else (None, extra_gmem)


def _sum_col_sums(parts, e: int):
  return parts.sum(0).reshape(e)


def split_bwd_smem_bytes(c: int, hc: int, stages: int, itemsize: int = 2,
                         bm: int = BLOCK_M, col_sums_e: int = 0) -> int:
  """Shared memory of ``_hidden_grad_kernel``: z and g tiles, ``stages`` slices of W1^T and
  W2, two staging slots each for h and da, vectors, 2 KiB for barriers (and, with
  ``col_sums_e`` = E, the CTA's float32 column sums of da)."""
  return (itemsize * (2 * bm * c + 2 * stages * hc * c + 4 * bm * hc)
          + 4 * (c + stages * hc + col_sums_e + bm) + 2048)


def split_unsupported_reason(m: int, c: int, e: int, dtype, act: str = "gelu",
                             hidden_chunk: int = 32, stages: int = 2,
                             col_sums: bool = False,
                             two_warpgroups: bool = False, zn_ones: bool = False,
                             h_scales: bool = False) -> str | None:
  """Why ``hidden_grads`` (the backward for the split form, C > 256) cannot run (with
  ``two_warpgroups``: its ``_hidden_grad_kernel_ws`` form, ``stages`` per warpgroup; with
  the ``zn_ones`` / ``h_scales`` tiles), or None."""
  ones = _ones_bytes(zn_ones) + _ones_bytes(h_scales)
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return (f"the Mosaic GPU kernels take bfloat16/float16 activations (wgmma operands), "
            f"got {jnp.dtype(dtype).name}")
  if c % 64 or e % 64:
    return f"the split backward needs C and E to be multiples of 64, got C={c}, E={e}"
  if hidden_chunk % 32 or e % hidden_chunk:
    return f"the hidden chunk must be a multiple of 32 dividing E={e}, got {hidden_chunk}"
  if m <= 0:
    return f"no rows (M={m})"
  if two_warpgroups:
    if col_sums:
      return ("db1 column sums (col_sums) are not available with two compute warpgroups "
              "(their cross-warp reductions would share one scratch buffer)")
    if (e // hidden_chunk) % 2:
      return (f"two compute warpgroups split the hidden chunks evenly: E / hidden_chunk = "
              f"{e // hidden_chunk} is odd")
    smem = lambda c_, hc_, st_, itemsize: split_ws_smem_bytes(c_, e, hc_, st_, itemsize) + ones
    return _kernel_reason("two-warpgroup split backward kernel", smem, c, act, hidden_chunk,
                          stages, dtype)
  smem = lambda *a: split_bwd_smem_bytes(*a, col_sums_e=e if col_sums else 0) + ones
  return _kernel_reason("split backward kernel", smem, c, act, hidden_chunk, stages, dtype)


def _hidden_grad_kernel(z_gmem, g_gmem, rs_gmem, zb_gmem, w1t_gmem, b1_gmem, w2_gmem, h_gmem, da_gmem,
                        *extra_gmem, e: int, hc: int, act: str, normalize: bool, eps: float,
                        stages: int, bm: int, with_zn: bool = False, zn_ones: bool = False,
                        h_scales: bool = False):
  """The split form's backward kernel (C > 256): ``_bwd_kernel`` without the dzn
  accumulator (64 x C float32 would not fit in registers) -- per hidden chunk a_j and dh_j
  (wgmmas over the column blocks of the z / g tiles), h_j and da_j to DRAM; dzn = da W1^T
  and the LayerNorm backward are left to XLA.  z_gmem's tile is normalised in place
  (mosaic_split's column-block LayerNorm) and, ``with_zn``, stored to the first of
  ``extra_gmem`` (with ``zn_ones`` ones after its column C; the optional db1 column sums
  follow, as ``_bwd_kernel``'s; ``h_scales`` as ``_bwd_kernel``'s); w1t_gmem, w2_gmem:
  (n_cb, E, cb)."""
  from pallas_kernels.mosaic_split import _normalise_in_place
  zn_gmem, db1_gmem = _optional_refs(extra_gmem, with_zn)
  dtype = z_gmem.dtype
  n_cb, _, cb = w1t_gmem.shape
  cta = lax.axis_index("m")
  rows = pl.ds(cta * bm, bm)
  t_cb = _transforms(cb, dtype)

  def scoped(z_smem, g_smem, rs_smem, zb_smem, out_smem, bars, *db1_smem, ones_smem=None,
             scales_smem=None):
    db1_smem = db1_smem[0] if db1_smem else None
    if rs_gmem is None:
      rs_smem = None
    else:
      plgpu.copy_gmem_to_smem(rs_gmem.at[rows], rs_smem, bars.at[2 * n_cb + 1])
      plgpu.barrier_wait(bars.at[2 * n_cb + 1])
    for b in range(n_cb):
      plgpu.copy_gmem_to_smem(z_gmem.at[rows, pl.ds(b * cb, cb)], z_smem.at[b], bars.at[b])
      plgpu.copy_gmem_to_smem(g_gmem.at[rows, pl.ds(b * cb, cb)], g_smem.at[b],
                              bars.at[n_cb + b])
    plgpu.copy_gmem_to_smem(zb_gmem, zb_smem, bars.at[2 * n_cb])
    for b in list(range(n_cb)) + [2 * n_cb]:
      plgpu.barrier_wait(bars.at[b])
    _normalise_in_place(z_smem, zb_smem, normalize=normalize, eps=eps)
    if zn_gmem is not None:  # read-only from here on; awaited with the h / da stores
      _store_zn_blocks(z_smem, zn_gmem, rows, ones_smem if zn_ones else None)
    if h_scales:
      _store_scales(scales_smem, rs_smem, h_gmem, rows, e)
    for b in range(n_cb, 2 * n_cb):
      plgpu.barrier_wait(bars.at[b])

    def chunk(idx, w1t_smem, b1_smem, w2_smem):
      (j,) = idx

      a, dh = _chunk_matmuls(z_smem, g_smem, w1t_smem, w2_smem, hc)
      h, da = _hidden_grad(a, dh, b1_smem, rs_smem, act)
      _store_hidden(h, da, out_smem, j, rows, h_gmem, da_gmem, db1_smem=db1_smem)

    plgpu.emit_pipeline(
        chunk,
        grid=(e // hc,),
        in_specs=[
            plgpu.BlockSpec((n_cb, hc, cb), lambda j: (0, j, 0), transforms=t_cb),
            plgpu.BlockSpec((hc,), lambda j: (j,)),
            plgpu.BlockSpec((n_cb, hc, cb), lambda j: (0, j, 0), transforms=t_cb),
        ],
        max_concurrent_steps=stages,
    )(w1t_gmem, b1_gmem, w2_gmem)
    if db1_smem is not None:  # the last chunk's stores committed its row
      plgpu.copy_smem_to_gmem(db1_smem, db1_gmem[0].at[cta])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(
      scoped,
      plgpu.SMEM((n_cb, bm, cb), dtype, transforms=t_cb),
      plgpu.SMEM((n_cb, bm, cb), dtype, transforms=t_cb),
      plgpu.SMEM((bm,), jnp.float32),
      plgpu.SMEM((n_cb, cb), jnp.float32),
      plgpu.SMEM((2, 2, bm, hc), dtype, transforms=_transforms(hc, dtype)),
      plgpu.Barrier(num_barriers=2 * n_cb + 2),
      *([plgpu.SMEM((e // hc, hc), jnp.float32)] if db1_gmem else []),
      **({"ones_smem": _ones_tiles(dtype)} if zn_ones else {}),
      **({"scales_smem": _ones_tiles(dtype)} if h_scales else {}),
  )


def split_ws_smem_bytes(c: int, e: int, hc: int, stages: int, itemsize: int = 2) -> int:
  """Shared memory of ``_hidden_grad_kernel_ws``: the z and g tiles (64 rows, shared by both
  compute warpgroups), per compute warpgroup ``stages`` slices each of W1^T and W2 and one
  staging slot each for h and da; z_bias, all of b1, the row scales, 2 KiB for barriers.
  At C=384, E=1536, hc=32, 1 stage: 224,512 bytes (2 stages: 322,816); Mosaic GPU counted
  224,368 for the former (CUDA lowering, jax 0.11.2), 1.4 KB over an earlier formula with
  2 KiB for barriers, hence 3.5 KiB here."""
  return (itemsize * (2 * 64 * c + 2 * stages * 2 * hc * c + 2 * 2 * 64 * hc)
          + 4 * (c + e + 64) + 3584)


def _hidden_grad_kernel_ws(z_gmem, g_gmem, rs_gmem, zb_gmem, w1t_gmem, b1_gmem, w2_gmem,
                           h_gmem, da_gmem, *extra_gmem, e: int, hc: int, act: str,
                           normalize: bool, eps: float, stages: int, with_zn: bool = False,
                           zn_ones: bool = False, h_scales: bool = False):
  """``_hidden_grad_kernel`` with two compute warpgroups on the same 64 rows, splitting the
  hidden chunks between them (warpgroup w takes chunks w, w + 2, ...), and a third
  warpgroup that only issues the weight TMA copies into each compute warpgroup's own
  ``stages`` slots, refilling a slot as soon as that warpgroup's a / dh wgmmas have read it.
  Why: the split backward at C=384 has one 64-row warpgroup per SM (its z and g tiles take
  96 KB), so the tensor cores idle during every chunk's activation, GELU' and stores; here
  one warpgroup's wgmmas run while the other evaluates.  (Two warpgroups of 64 rows each,
  as ``_bwd_kernel_ws``, would need both tiles twice: 192 KB.)  No dzn accumulates across
  chunks in the split form, so the warpgroups need not combine anything.  Warpgroup 0
  loads and normalises the shared tiles and then releases warpgroup 1 (``tiles_ready``).
  No db1 column sums (see ``_bwd_kernel_ws``)."""
  from pallas_kernels.mosaic_split import _normalise_in_place
  zn_gmem = extra_gmem[0] if with_zn else None
  dtype = z_gmem.dtype
  n_cb, _, cb = w1t_gmem.shape
  per_wg = e // hc // 2
  cta = lax.axis_index("m")
  rows = pl.ds(cta * 64, 64)
  t_cb = _transforms(cb, dtype)

  def body(z_smem, g_smem, rs_smem, zb_smem, b1_smem, w1t_smem, w2_smem, out_smem, tile_bars,
           param_bars, tiles_ready, w1_bars, w2_bars, w_free, ones_smem=None,
           scales_smem=None):
    def _compute(wgi):

      @pl.when(wgi == 0)
      def _load_tiles():
        if rs_gmem is not None:
          plgpu.copy_gmem_to_smem(rs_gmem.at[rows], rs_smem, tile_bars.at[2 * n_cb])
        for b in range(n_cb):
          cols = pl.ds(b * cb, cb)
          plgpu.copy_gmem_to_smem(z_gmem.at[rows, cols], z_smem.at[b], tile_bars.at[b])
          plgpu.copy_gmem_to_smem(g_gmem.at[rows, cols], g_smem.at[b], tile_bars.at[n_cb + b])
        for b in range(n_cb):
          plgpu.barrier_wait(tile_bars.at[b])
        plgpu.barrier_wait(param_bars.at[0])
        _normalise_in_place(z_smem, zb_smem, normalize=normalize, eps=eps)
        if zn_gmem is not None:  # read-only from here on; awaited with the h / da stores
          _store_zn_blocks(z_smem, zn_gmem, rows, ones_smem if zn_ones else None)
        for b in range(n_cb, 2 * n_cb + (rs_gmem is not None)):
          plgpu.barrier_wait(tile_bars.at[b])
        if h_scales:
          _store_scales(scales_smem, None if rs_gmem is None else rs_smem, h_gmem, rows, e)
        plgpu.barrier_arrive(tiles_ready.at[0])

      @pl.when(wgi == 1)
      def _wait_tiles():
        plgpu.barrier_wait(tiles_ready.at[0])

      plgpu.barrier_wait(param_bars.at[1])
      my_rs = None if rs_gmem is None else rs_smem
      my_out = out_smem.at[wgi]

      @pl.loop(0, per_wg)
      def _chunk(t):
        j = 2 * t + wgi
        slot = lax.rem(t, stages)
        w1t, w2 = w1t_smem.at[wgi, slot], w2_smem.at[wgi, slot]
        plgpu.barrier_wait(w1_bars.at[wgi * stages + slot])
        plgpu.barrier_wait(w2_bars.at[wgi * stages + slot])

        a, dh = _chunk_matmuls(z_smem, g_smem, w1t, w2, hc)
        plgpu.barrier_arrive(w_free.at[wgi * stages + slot])
        h, da = _hidden_grad(a, dh, b1_smem.at[j], my_rs, act)
        _store_hidden(h, da, my_out, j, rows, h_gmem, da_gmem, slots=1)

      plgpu.wait_smem_to_gmem(0)

    def _memory():
      plgpu.copy_gmem_to_smem(zb_gmem, zb_smem, param_bars.at[0])
      plgpu.copy_gmem_to_smem(b1_gmem, b1_smem, param_bars.at[1])

      @pl.loop(0, per_wg)
      def _load(t):
        slot = lax.rem(t, stages)
        for w in range(2):  # chunk 2 t + w into warpgroup w's slot, once it released it
          bar = w * stages + slot

          @pl.when(t >= stages)
          def _():
            plgpu.barrier_wait(w_free.at[bar])
          chunk = pl.ds((2 * t + w) * hc, hc)
          plgpu.copy_gmem_to_smem(w1t_gmem.at[:, chunk], w1t_smem.at[w, slot], w1_bars.at[bar])
          plgpu.copy_gmem_to_smem(w2_gmem.at[:, chunk], w2_smem.at[w, slot], w2_bars.at[bar])

      # Observe the last releases too, so every barrier phase is drained before the
      # barriers are freed.
      for t in range(max(per_wg - stages, 0), per_wg):
        for w in range(2):
          plgpu.barrier_wait(w_free.at[w * stages + t % stages])

    _warp_roles(_compute, _memory)

  pl.run_scoped(
      body,
      plgpu.SMEM((n_cb, 64, cb), dtype, transforms=t_cb),
      plgpu.SMEM((n_cb, 64, cb), dtype, transforms=t_cb),
      plgpu.SMEM((64,), jnp.float32),
      plgpu.SMEM((n_cb, cb), jnp.float32),
      plgpu.SMEM((e // hc, hc), jnp.float32),
      plgpu.SMEM((2, stages, n_cb, hc, cb), dtype, transforms=t_cb),
      plgpu.SMEM((2, stages, n_cb, hc, cb), dtype, transforms=t_cb),
      plgpu.SMEM((2, 1, 2, 64, hc), dtype, transforms=_transforms(hc, dtype)),
      plgpu.Barrier(num_barriers=2 * n_cb + 1),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=1),
      plgpu.Barrier(num_barriers=2 * stages),
      plgpu.Barrier(num_barriers=2 * stages),
      plgpu.Barrier(num_barriers=2 * stages),
      **({"ones_smem": _ones_tiles(dtype)} if zn_ones else {}),
      **({"scales_smem": _ones_tiles(dtype)} if h_scales else {}),
      collective_axes="wg",
  )


@_switches.jit(static_argnames=("act", "normalize", "eps", "hidden_chunk",
                                "stages", "col_sums", "with_zn", "zn_ones",
                                "h_scales", "two_warpgroups", "interpret"))
def hidden_grads(z, g, w1, b1, w2, *, z_bias=None, row_scale=None, act: str = "gelu",
                 normalize: bool = True,
                 eps: float = 1e-6, hidden_chunk: int = 32, stages: int = 2,
                 col_sums: bool = False, with_zn: bool = False, zn_ones: bool = False,
                 h_scales: bool = False, two_warpgroups: bool = False,
                 interpret: bool = False):
  """(h, da) of ``fused_mlp`` / ``split_mlp`` for the cotangent g and row scale rs, as
  ``fused_mlp_bwd`` returns them (``row_scale`` likewise), for C > 256 (``_hidden_grad_kernel``; dz is then
  ``ln_backward(da W1^T)`` in XLA).  Shapes as ``fused_mlp_bwd``; raises
  NotImplementedError naming the reason for unsupported calls
  (``split_unsupported_reason``).  ``with_zn``, ``zn_ones``, ``h_scales`` and ``col_sums``:
  as ``fused_mlp_bwd``'s.  ``two_warpgroups``: ``_hidden_grad_kernel_ws`` (two compute
  warpgroups on alternate hidden chunks of the same rows; ``stages`` weight slots per
  warpgroup; no ``col_sums``)."""
  from pallas_kernels.mosaic_split import _column_block
  m, c, e = _check_bwd_args(z, g, w1, b1, w2)
  _check_zn_ones("hidden_grads", zn_ones, with_zn, col_sums)
  reason = split_unsupported_reason(m, c, e, z.dtype, act, hidden_chunk, stages, col_sums,
                                    two_warpgroups, zn_ones, h_scales)
  if reason is not None:
    raise NotImplementedError(f"hidden_grads: {reason}")
  dtype = z.dtype
  cb = _column_block(c)
  zb, z, g, rs, m_pad = _bwd_inputs(z, g, z_bias, row_scale)
  blocks = lambda w_ec: w_ec.astype(dtype).reshape(e, c // cb, cb).transpose(1, 0, 2)
  common = dict(e=e, hc=hidden_chunk, act=act, normalize=normalize, eps=float(eps),
                stages=stages, with_zn=with_zn, zn_ones=zn_ones, h_scales=h_scales)
  if two_warpgroups:
    kernel = functools.partial(_hidden_grad_kernel_ws, **common)
    threads = dict(num_threads=3, thread_name="wg")
    b1_arg = b1.astype(jnp.float32).reshape(e // hidden_chunk, hidden_chunk)
  else:
    kernel = functools.partial(_hidden_grad_kernel, bm=BLOCK_M, **common)
    threads = {}
    b1_arg = b1.astype(jnp.float32)
  h, da, *rest = plgpu.kernel(
      _rs_optional(kernel, rs is not None),
      out_type=(jax.ShapeDtypeStruct((m_pad, _h_width(e, hidden_chunk, dtype, h_scales)), dtype),
                jax.ShapeDtypeStruct((m_pad, e), dtype),
                *_optional_types(m_pad, c, e, hidden_chunk, dtype, with_zn, col_sums, zn_ones,
                                 split=True)),
      grid=(m_pad // BLOCK_M,), grid_names=("m",), **threads,
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret),
  )(z, g, *([] if rs is None else [rs]), zb.reshape(c // cb, cb), blocks(w1.T),
    b1_arg, blocks(w2))
  return _trim_results(m, m_pad, e, [h, da], rest, with_zn, col_sums)


def ln_backward(dzn, z, zb, normalize: bool, eps: float):
  """dz from dzn through zn = norm(z + zb), float32 jnp (the split backward's epilogue)."""
  if not normalize:
    return dzn
  zf = z.astype(jnp.float32) + zb.astype(jnp.float32)
  d = zf - zf.mean(-1, keepdims=True)
  rstd = lax.rsqrt(jnp.square(d).mean(-1, keepdims=True) + eps)
  zhat = d * rstd
  return (dzn - dzn.mean(-1, keepdims=True)
          - zhat * (dzn * zhat).mean(-1, keepdims=True)) * rstd


class MlpConfig(NamedTuple):
  """Static arguments of ``mlp_with_grad`` (the forward kernels' and the backward's)."""
  act: str = "gelu"
  normalize: bool = True
  eps: float = 1e-6
  hidden_chunk: int = 64
  stages: int = 2
  block_m: int = 64
  bwd_stages: int = 2
  interpret: bool = False
  split: bool = False           # forward: mosaic_split.split_mlp; backward: hidden_grads
  project_stages: int = 3       # split_mlp's
  project_block_m: int = 64     # split_mlp's
  block_n: int = 0              # split_mlp's (0: its default)
  bwd_hidden: int = 64          # the backward kernel's hidden chunk
  bwd_col_sums: bool = False    # db1 from the backward kernel's per-CTA column sums
  bwd_zn: bool = True           # zn for dW1 from the backward kernel (else XLA recomputes it)
  unit_rows: bool = False       # row_scale was None (all ones): no scaling in the backward
  has_res: bool = True          # False: res was None (the (0, C) placeholder stands in)
  bwd_block_m: int = 64         # the backward kernel's rows per CTA (128: _bwd_kernel_ws)
  bwd_split_ws: bool = False    # split: hidden_grads(two_warpgroups=True)
  bwd_db1_gemm: bool = False    # db1 as the dW1 GEMM's extra row (the kernels' zn_ones)
  bwd_db2_gemm: bool = False    # db2 as the dW2 GEMM's extra row (the kernels' h_scales)


def _normalised(z, zb, normalize: bool, eps: float):
  z = z.astype(jnp.float32) + zb.astype(jnp.float32)
  if normalize:
    mean = z.mean(-1, keepdims=True)
    d = z - mean
    z = d * lax.rsqrt(jnp.square(d).mean(-1, keepdims=True) + eps)
  return z


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _mlp(z, res, w1, b1, w2, b2, zb, rs, cfg: MlpConfig):
  if not cfg.has_res:  # fused_mlp reads no residual; split_mlp's project kernel needs one
    res = jnp.zeros_like(z) if cfg.split else None
  if cfg.split:
    from pallas_kernels import mosaic_split
    return mosaic_split.split_mlp(
        z, res, w1, b1, w2, b2, z_bias=zb, row_scale=rs, act=cfg.act, normalize=cfg.normalize,
        eps=cfg.eps, stages=cfg.stages, project_stages=cfg.project_stages,
        project_block_m=cfg.project_block_m, block_n=cfg.block_n or None,
        interpret=cfg.interpret)
  return mosaic_mlp.fused_mlp(z, res, w1, b1, w2, b2, z_bias=zb, row_scale=rs, act=cfg.act,
                              normalize=cfg.normalize, eps=cfg.eps,
                              hidden_chunk=cfg.hidden_chunk, stages=cfg.stages,
                              block_m=cfg.block_m, interpret=cfg.interpret)


def _mlp_fwd(z, res, w1, b1, w2, b2, zb, rs, cfg):
  vals = [p.value for p in (z, res, w1, b1, w2, b2, zb, rs)]
  y = _mlp(*vals, cfg)
  return y, (vals[0], vals[2], vals[3], vals[4], vals[5], vals[6], vals[7], rs.perturbed)


def _mlp_bwd(cfg, saved, dy):
  z, w1, b1, w2, b2, zb, rs, rs_perturbed = saved
  f32 = jnp.float32
  zeros = lambda v: jnp.zeros(v.shape, v.dtype)
  dres_shape = z.shape if cfg.has_res else (0, z.shape[1])
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    return (zeros(z), jnp.zeros(dres_shape, z.dtype), zeros(w1), zeros(b1), zeros(w2),
            zeros(b2), zeros(zb), zeros(rs))
  dtype = z.dtype
  dy = dy.astype(dtype)
  # Unless rs itself needs a gradient (which wants h unscaled), the kernel applies the row
  # scale on chip and returns h scaled by it: g stays dy, and no pass writes rs * dy.
  if rs_perturbed:
    g, kernel_rs = (dy.astype(f32) * rs.astype(f32)[:, None]).astype(dtype), None
  else:  # with rs all ones (no row_scale given) there is nothing to scale
    g, kernel_rs = dy, None if cfg.unit_rows else rs
  # db2 from the dW2 GEMM: the kernel writes each row's scale (rs on chip, else 1) after h,
  # and [h | s]^T g has sum_r s_r g_r = db2 as its row E (not with a perturbed rs, whose
  # gradient reads h itself).
  h_scales = cfg.bwd_db2_gemm and not rs_perturbed
  if cfg.split:  # dzn = da W1^T and the LayerNorm backward in XLA
    h, da, *rest = hidden_grads(z, g, w1, b1, w2, z_bias=zb, row_scale=kernel_rs, act=cfg.act,
                                normalize=cfg.normalize, eps=cfg.eps,
                                hidden_chunk=cfg.bwd_hidden, stages=cfg.bwd_stages,
                                col_sums=cfg.bwd_col_sums, with_zn=cfg.bwd_zn,
                                zn_ones=cfg.bwd_db1_gemm, h_scales=h_scales,
                                two_warpgroups=cfg.bwd_split_ws,
                                interpret=cfg.interpret)
    dzn = jnp.dot(da, w1.astype(dtype).T, preferred_element_type=f32)
    dz = ln_backward(dzn, z, zb, cfg.normalize, cfg.eps).astype(dtype)
  else:
    dz, h, da, *rest = fused_mlp_bwd(z, g, w1, b1, w2, z_bias=zb, row_scale=kernel_rs,
                                     act=cfg.act,
                                     normalize=cfg.normalize, eps=cfg.eps,
                                     hidden_chunk=cfg.bwd_hidden, stages=cfg.bwd_stages,
                                     col_sums=cfg.bwd_col_sums, with_zn=cfg.bwd_zn,
                                     zn_ones=cfg.bwd_db1_gemm, h_scales=h_scales,
                                     block_m=cfg.bwd_block_m,
                                     interpret=cfg.interpret)
  zn = rest.pop(0) if cfg.bwd_zn else _normalised(z, zb, cfg.normalize, cfg.eps).astype(dtype)
  dw1 = jnp.dot(zn.T, da, preferred_element_type=f32)
  dw2 = jnp.dot(h.T, g, preferred_element_type=f32)  # h is rs act(a) when g is dy
  if cfg.bwd_db1_gemm:  # zn's first ones column made row C of [zn | 1]^T da = sum(da)
    c = z.shape[1]
    dw1, db1 = dw1[:c], dw1[c]
  else:  # the kernel's column sums, if asked for, else a pass over da
    db1 = rest[0] if rest else da.astype(f32).sum(0)
  if h_scales:
    e = w1.shape[1]
    dw2, db2 = dw2[:e], dw2[e]
  else:
    db2 = (g.astype(f32) if kernel_rs is None
           else dy.astype(f32) * rs.astype(f32)[:, None]).sum(0)  # read-only pass over dy
  dzb = dz.astype(f32).sum(0)
  if rs_perturbed:  # d rs[r] = sum_c dy[r, c] (h W2 + b2)[r, c]: one more GEMM
    u = jnp.dot(h, w2.astype(dtype), preferred_element_type=f32) + b2.astype(f32)
    drs = (dy.astype(f32) * u).sum(1)
  else:
    drs = jnp.zeros(rs.shape, f32)
  dres = dy if cfg.has_res else jnp.zeros(dres_shape, dtype)
  return (dz, dres, dw1.astype(w1.dtype), db1.astype(b1.dtype), dw2.astype(w2.dtype),
          db2.astype(b2.dtype), dzb.astype(zb.dtype), drs.astype(rs.dtype))


_mlp.defvjp(_mlp_fwd, _mlp_bwd, symbolic_zeros=True)


def mlp_with_grad(z, res, w1, b1, w2, b2, *, z_bias=None, row_scale=None, act: str = "gelu",
                  normalize: bool = True, eps: float = 1e-6, hidden_chunk: int = 64,
                  stages: int = 2, block_m: int = 64, bwd_stages: int = 2,
                  split: bool = False, project_stages: int = 3, project_block_m: int = 64,
                  block_n: int | None = None, bwd_hidden: int = 0, bwd_col_sums: bool = False,
                  bwd_zn: bool = True, bwd_block_m: int = 64, bwd_split_ws: bool = False,
                  bwd_db1_gemm: bool = False, bwd_db2_gemm: bool = False,
                  interpret: bool = False):
  """``mosaic_mlp.fused_mlp`` (same arguments and result; res may be None: no residual read
  or added, and no zeros passed to the kernel) with a Mosaic GPU backward: the
  forward kernel saves only its inputs, the backward is ``fused_mlp_bwd`` plus XLA's GEMMs
  for the weight gradients.  Gradients flow to z, res, w1, b1, w2, b2, z_bias and (when it
  is perturbed) row_scale.  ``bwd_stages``: the backward kernel's weight pipeline depth;
  ``bwd_hidden``: its hidden chunk (0: ``hidden_chunk``, or 32 with ``split``);
  ``bwd_col_sums``: db1 from the kernel's per-CTA column sums of da instead of an XLA pass
  over da (``fused_mlp_bwd(col_sums=True)``); ``bwd_zn``: the normalised z for the dW1 GEMM
  from the backward kernel (``with_zn``) instead of XLA's recomputation; ``bwd_block_m``:
  the backward kernel's rows per CTA (128: two compute warpgroups, ``_bwd_kernel_ws``);
  ``bwd_split_ws`` (with ``split``): ``hidden_grads(two_warpgroups=True)``;
  ``bwd_db1_gemm`` (needs ``bwd_zn``, not ``bwd_col_sums``): the kernel's zn gets ones
  columns (``zn_ones``), so db1 comes out of the dW1 GEMM as one more row instead of from
  a pass over the 4C-wide da; ``bwd_db2_gemm``: the kernel's h gets the row scales after
  its E columns (``h_scales``), so db2 comes out of the dW2 GEMM instead of a pass over dy.

  ``split=True`` (C > 256): the forward is ``mosaic_split.split_mlp`` (``stages`` is its
  expand kernel's depth; ``project_stages``, ``project_block_m``, ``block_n`` its project
  kernel's) and the backward ``hidden_grads`` with dzn and the
  LayerNorm backward in XLA; ``hidden_chunk`` and ``block_m`` do not apply."""
  m, c, e = mosaic_mlp.check_mlp_args(z, res, w1, b1, w2, b2)
  bwd_hidden = bwd_hidden or (32 if split else hidden_chunk)
  if bwd_db1_gemm and (not bwd_zn or bwd_col_sums):
    raise ValueError("mlp_with_grad: bwd_db1_gemm=True needs bwd_zn=True (the ones columns "
                     "ride on the kernel's zn) and bwd_col_sums=False (another way to db1)")
  if split:
    if bwd_block_m != 64:
      raise ValueError(f"bwd_block_m={bwd_block_m}: the split backward (hidden_grads) has "
                       f"64-row CTAs only")
    reason = split_unsupported_reason(m, c, e, z.dtype, act, bwd_hidden, bwd_stages,
                                      bwd_col_sums, bwd_split_ws, bwd_db1_gemm, bwd_db2_gemm)
  else:
    if bwd_split_ws:
      raise ValueError("bwd_split_ws=True is the split backward's (split=True) option")
    reason = unsupported_reason(m, c, e, z.dtype, act, bwd_hidden, bwd_stages, bwd_col_sums,
                                bwd_block_m, bwd_db1_gemm, bwd_db2_gemm)
  if reason is not None:
    raise NotImplementedError(f"mlp_with_grad: {reason}")
  zb = jnp.zeros((c,), jnp.float32) if z_bias is None else z_bias
  rs = jnp.ones((m,), jnp.float32) if row_scale is None else row_scale
  cfg = MlpConfig(act, bool(normalize), float(eps), hidden_chunk, stages, block_m, bwd_stages,
                  bool(interpret), bool(split), project_stages, project_block_m, block_n or 0,
                  bwd_hidden, bool(bwd_col_sums), bool(bwd_zn), row_scale is None,
                  res is not None, int(bwd_block_m), bool(bwd_split_ws), bool(bwd_db1_gemm),
                  bool(bwd_db2_gemm))
  if res is None:  # a zero-size stand-in: the custom_vjp takes arrays
    res = jnp.zeros((0, c), z.dtype)
  return _mlp(z, res, w1, b1, w2, b2, zb, rs, cfg)
