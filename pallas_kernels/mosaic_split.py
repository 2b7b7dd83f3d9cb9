"""The pointwise half of a residual block for wide channel counts: two Mosaic GPU kernels.

    h = act(norm(z + zb) @ W1 + b1)              ``_expand_kernel``   (M, E) in z's dtype
    y = res + row_scale * (h @ W2 + b2)          ``_project_kernel``

The same function as ``mosaic_mlp.fused_mlp``, for the channel counts it cannot take
(C > 256: ConvNeXt-T's 384 and 768).  There one CTA would have to hold a 64 x C float32
output accumulator (192+ registers per thread at C=384) next to the hidden chunk, and the
normalised tile plus two stages of (hidden chunk x C) slices of both weights exceed shared
memory.  Splitting the block at the hidden activation removes both limits: each kernel is
a pipelined GEMM with the block's element-wise work fused into its prologue or epilogue,

* expand: one CTA per 64 rows loads its z tile once (TMA), LayerNorms it in place in
  shared memory (in column blocks of at most 256, so a row never needs C float32 registers),
  then streams (hc x C) slices of W1^T: per slice one wgmma (64 x C x hc), bias + activation
  in registers, and the (64 x hc) result goes back to DRAM by TMA through two staging tiles
  (one where two do not fit);
* project: one CTA per (64 rows, ``block_n`` output channels) streams (64 x kc) tiles of h
  and (kc x block_n) tiles of W2, accumulates in registers, and writes
  res + row_scale * (acc + b2) once.

* expand, warp-specialised (``_expand_kernel_ws``, ``split_mlp(expand_ws_slots=n)``): 128
  rows per CTA; two compute warpgroups take alternate hidden slices over all of them (one's
  wgmmas run while the other's bias + activation + store do), a third streams the W1^T
  slices into each one's ``n`` slots.  MBConv blocks use it at C=384 (expand 0.117 vs
  0.133 ms at 14x14x384 E4, batch 128, H100 2026-11-27), ConvNeXt's C=384 inference forward
  from 32,768 rows.

* expand / project as K-streaming GEMMs (``split_mlp(expand_gemm=, project_gemm=)``:
  mosaic_gemm.py): 128 x 192 output tiles, both operands streamed, the LayerNorm in the
  expand's epilogue; the expand default at C=768 (ConvNeXt's H100 table, MBConv).

The E-wide activation makes exactly one round trip through DRAM, in z's dtype: compared
with the fused kernel, 2 * M * E * 2 bytes of extra traffic and no repeated matmul work.
Measured (ConvNeXt-T stage 3, 14x14x384, batch 128, bf16, 2026-11-26): expand 0.13 ms,
project 0.08-0.10 ms; the whole block forward with the Pallas depthwise conv 0.28-0.29 ms vs
XLA's 0.42 on an H100 (benchmarks/RESULTS.md).  Limits: bfloat16/float16, C a multiple of
64, E a multiple of 64, and the expand pipeline must fit shared memory (C=768 takes 32-wide
hidden slices).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _switches, mosaic_gemm, mosaic_mlp
from pallas_kernels.mosaic_mlp import _WG, _activate, _interpret_params, _transforms

BLOCK_M = 64
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per CTA (opt-in maximum)
_COLUMN_BLOCKS = (256, 192, 128, 64)


def _column_block(c: int) -> int:
  return next(b for b in _COLUMN_BLOCKS if c % b == 0)


def expand_smem_bytes(c: int, hc: int, stages: int, itemsize: int = 2, bm: int = BLOCK_M,
                      staging: int = 2) -> int:
  """Shared memory of ``_expand_kernel``: the z tile, ``stages`` W1^T slices, two output
  staging tiles, and the small vectors."""
  # + 2 KiB: barriers and alignment (the compiler counted 40 bytes more than this formula
  # without it for C=384, 128 rows, two staging tiles: 232,488 > 232,448 bytes).
  return (itemsize * (bm * c + stages * hc * c + staging * bm * hc) + 4 * (c + stages * hc)
          + 2048)


def project_smem_bytes(bn: int, kc: int, stages: int, itemsize: int = 2,
                       bm: int = BLOCK_M) -> int:
  return itemsize * (bm * bn + stages * (bm * kc + kc * bn)) + 4 * (bm + bn) + 1024


def choose_hidden_chunk(c: int, stages: int, bm: int = BLOCK_M) -> int | None:
  """The largest expand slice width (64 or 32) whose pipeline fits in shared memory (with
  one output staging tile at least)."""
  for hc in (64, 32):
    if expand_smem_bytes(c, hc, stages, bm=bm, staging=1) <= SMEM_BYTES:
      return hc
  return None


def choose_staging(c: int, hc: int, stages: int, bm: int = BLOCK_M) -> int:
  """Output staging tiles of the expand kernel: two (a chunk's TMA store overlaps the next
  chunk) where they fit shared memory, else one (C=384 with 128-row CTAs: 40 bytes over)."""
  return 2 if expand_smem_bytes(c, hc, stages, bm=bm, staging=2) <= SMEM_BYTES else 1


def unsupported_reason(m: int, c: int, e: int, dtype, stages: int = 2) -> str | None:
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return (f"the Mosaic GPU kernels take bfloat16/float16 activations (wgmma operands), "
            f"got {jnp.dtype(dtype).name}")
  if c % 64:
    return f"the split Mosaic kernels need C to be a multiple of 64, got C={c}"
  if e % 64:
    return f"the split Mosaic kernels need the hidden width to be a multiple of 64, got {e}"
  if choose_hidden_chunk(c, stages) is None:
    return (f"C={c} with {stages} pipeline stages does not fit the expand kernel's shared "
            f"memory ({expand_smem_bytes(c, 32, stages)} > {SMEM_BYTES} bytes)")
  if m <= 0:
    return f"no rows (M={m})"
  return None


def _normalise_in_place(z_smem, zb_smem, *, normalize: bool, eps: float):
  """z_smem <- LN(z + zb) (or z + zb) for z_smem (n_cb, rows, cb) holding the row tile's
  channels in n_cb column blocks, block by block: one pass for the row sums, one for the
  variance, one to write (each thread rewrites exactly the elements it read, so in place is
  safe), so a row never needs C float32 registers.  ``z_smem`` may also be a sequence of
  n_cb (rows, cb) refs."""
  blocks = ([z_smem.at[b] for b in range(z_smem.shape[0])] if hasattr(z_smem, "shape")
            else list(z_smem))
  n_cb = len(blocks)
  rows, cb = blocks[0].shape
  c = n_cb * cb

  def load(b):
    z = plgpu.load(blocks[b], layout=_WG).astype(jnp.float32)
    zb = plgpu.load(zb_smem.at[b], layout=_WG.reduce(0))
    return z + lax.broadcast_in_dim(zb, (rows, cb), [1])

  if normalize:
    mean = sum(load(b).sum(axis=1) for b in range(n_cb)) * (1.0 / c)
    bmean = lambda: lax.broadcast_in_dim(mean, (rows, cb), [0])
    var = sum(jnp.square(load(b) - bmean()).sum(axis=1) for b in range(n_cb)) * (1.0 / c)
    rstd = lax.broadcast_in_dim(lax.rsqrt(var + eps), (rows, cb), [0])
  for b in range(n_cb):
    z = load(b)
    if normalize:
      z = (z - bmean()) * rstd
    blocks[b][...] = z.astype(blocks[b].dtype)
  plgpu.commit_smem()


def _expand_refs(refs, has_zb: bool, row_mask: bool, normalize: bool):
  """(zb_gmem or None, w1t_gmem, b1_gmem, mask_gmem or None, h_gmem) from an expand
  kernel's refs after z_gmem."""
  refs = list(refs)
  zb_gmem = refs.pop(0) if has_zb else None
  w1t_gmem, b1_gmem = refs.pop(0), refs.pop(0)
  mask_gmem = refs.pop(0) if row_mask else None
  (h_gmem,) = refs
  if normalize and not has_zb:
    raise ValueError("the normalising expand kernel needs zb")
  return zb_gmem, w1t_gmem, b1_gmem, mask_gmem, h_gmem


def _expand_kernel(z_gmem, *refs, e: int, hc: int, act: str, normalize: bool, eps: float,
                   stages: int, bm: int, staging: int = 2, pipelined: bool = False,
                   row_mask: bool = False, has_zb: bool = True):
  """refs: [zb_gmem (n_cb, cb) when ``has_zb``], w1t_gmem (n_cb, E, cb) = W1^T in column
  blocks (a TMA copy moves at most 256 elements along each dimension, so C=384/768 rows go
  in blocks), b1_gmem, [mask_gmem (M,) f32 when ``row_mask``: b1 is scaled per row, so that
  rows with z = 0 and mask 0 give act(0)], h_gmem.  Without zb and normalisation the z tile
  is used as loaded.

  ``pipelined``: each pipeline step takes two hidden slices of ``hc`` (its W1^T block is 2 hc
  rows), issues both slices' wgmmas into two accumulators, then reads the first with
  ``wgmma_accumulator_load(wait_n=n_cb)`` -- the second slice's n_cb wgmmas stay in flight
  while the first slice's bias + activation + store run -- and then the second (wait_n=0).
  Every wgmma is retired inside its step, so the weight slots need no delayed release.
  Measured slower than the serial form on an H100 (see ``split_mlp``); off by default."""
  zb_gmem, w1t_gmem, b1_gmem, mask_gmem, h_gmem = _expand_refs(refs, has_zb, row_mask,
                                                                normalize)
  dtype = z_gmem.dtype
  n_cb, _, cb = w1t_gmem.shape
  rows = pl.ds(lax.axis_index("m") * bm, bm)

  def scoped(z_smem, h_smem, bars, *extra):
    extra = list(extra)
    zb_smem = extra.pop(0) if has_zb else None
    mask_smem = extra.pop(0) if row_mask else None
    for b in range(n_cb):
      plgpu.copy_gmem_to_smem(z_gmem.at[rows, pl.ds(b * cb, cb)], z_smem.at[b], bars.at[b])
    nbar = n_cb
    if has_zb:
      plgpu.copy_gmem_to_smem(zb_gmem, zb_smem, bars.at[nbar])
      nbar += 1
    if row_mask:
      plgpu.copy_gmem_to_smem(mask_gmem.at[rows], mask_smem, bars.at[nbar])
      nbar += 1
    for b in range(nbar):
      plgpu.barrier_wait(bars.at[b])
    if has_zb:
      _normalise_in_place(z_smem, zb_smem, normalize=normalize, eps=eps)

    def activate_and_store(h, b1_smem, j):
      h = _activate(h, b1_smem, act, dtype, mask_smem)
      # ``staging`` tiles: the TMA store issued ``staging`` chunks ago must have read this
      # one.  (Not the pipeline's own out_specs: their predicated stores are not modelled
      # by the interpreter the tests run in.)
      slot = lax.rem(j, staging)
      plgpu.wait_smem_to_gmem(staging - 1, wait_read_only=True)
      h_smem.at[slot][...] = h
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(h_smem.at[slot], h_gmem.at[rows, pl.ds(j * hc, hc)])

    g = 2 if pipelined else 1  # hidden slices per pipeline step

    def part(ref, half):  # slice ``half`` of a step's block (the whole block when g == 1)
      return ref if g == 1 else ref.at[pl.ds(half * hc, hc)]

    def slices(idx, w1t_smem, b1_smem):
      (k,) = idx

      def run(*accs):
        for half, acc in enumerate(accs):
          for b in range(n_cb):
            plgpu.wgmma(acc, z_smem.at[b], part(w1t_smem.at[b], half).transpose((1, 0)))
        for half, acc in enumerate(accs):  # later slices' wgmmas stay in flight
          h = plgpu.wgmma_accumulator_load(acc, wait_n=n_cb * (g - 1 - half))
          activate_and_store(h, part(b1_smem, half), g * k + half)
      pl.run_scoped(run, *[plgpu.ACC((bm, hc), jnp.float32)] * g)

    step = g * hc
    plgpu.emit_pipeline(
        slices,
        grid=(e // step,),
        in_specs=[
            plgpu.BlockSpec((n_cb, step, cb), lambda j: (0, j, 0),
                            transforms=_transforms(cb, dtype)),
            plgpu.BlockSpec((step,), lambda j: (j,)),
        ],
        max_concurrent_steps=stages,
    )(w1t_gmem, b1_gmem)
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(
      scoped,
      plgpu.SMEM((n_cb, bm, cb), dtype, transforms=_transforms(cb, dtype)),
      plgpu.SMEM((staging, bm, hc), dtype, transforms=_transforms(hc, dtype)),
      plgpu.Barrier(num_barriers=n_cb + has_zb + row_mask),
      *([plgpu.SMEM((n_cb, cb), jnp.float32)] if has_zb else []),
      *([plgpu.SMEM((bm,), jnp.float32)] if row_mask else []),
  )


WS_BLOCK_M = 128  # rows per CTA of the warp-specialised expand kernel


def expand_ws_smem_bytes(c: int, hc: int, slots: int, itemsize: int = 2, *,
                         has_zb: bool = False, row_mask: bool = False,
                         staging_halves: int = 2) -> int:
  """Shared memory of ``_expand_kernel_ws``: the 128-row z tile, ``slots`` (hc x C) W1^T
  slices and hc biases per compute warpgroup, ``staging_halves`` 64 x hc output staging
  tiles per compute warpgroup, the zb vector and row mask where used; + 1 KiB for barriers
  and alignment."""
  # With zb, + 2.5 KiB more: the compiler counted 234,608 bytes at C=384, hc=64, 1 slot,
  # two staging halves, where this sum without it is 232,448 (the LayerNorm's row
  # reductions; CUDA lowering on a CPU, 2026-11-27).
  bm = WS_BLOCK_M
  return (itemsize * (bm * c + 2 * slots * hc * c + 2 * staging_halves * 64 * hc)
          + 4 * 2 * slots * hc + (4 * c + 2560 if has_zb else 0) + (4 * bm if row_mask else 0)
          + 1024)


def choose_ws_tiles(c: int, e: int, slots: int, *, has_zb: bool = False,
                    row_mask: bool = False, widths=(64, 32)) -> tuple[int, int] | None:
  """(hidden slice width, staging halves) of ``_expand_kernel_ws``: the widest slice (64,
  then 32) that gives each compute warpgroup whole slices (E a multiple of 2 hc) and fits
  shared memory, with a whole 128-row staging tile per warpgroup where that fits, else one
  64-row half (stored in turn: C=384 with LayerNorm); None if nothing fits."""
  for hc in widths:
    for halves in (2, 1):
      if e % (2 * hc) == 0 and expand_ws_smem_bytes(
          c, hc, slots, has_zb=has_zb, row_mask=row_mask,
          staging_halves=halves) <= SMEM_BYTES:
        return hc, halves
  return None


def _expand_kernel_ws(z_gmem, *refs, e: int, hc: int, act: str, normalize: bool, eps: float,
                      slots: int, row_mask: bool = False, has_zb: bool = True,
                      staging_halves: int = 2):
  """``_expand_kernel`` for 128-row CTAs, warp-specialised (``num_threads=3``, axis "wg"):
  the two compute warpgroups take alternate hidden slices (slice j on warpgroup j % 2), each
  over all 128 rows, so that one warpgroup's wgmmas run while the other evaluates its bias +
  activation and stores its slice (the single-warpgroup kernel leaves the tensor cores idle
  during every epilogue).  Warpgroup 2 issues every TMA load: the z tile (two 64-row halves
  per column block), then each slice's W1^T block and biases into the ``slots`` slots of the
  warpgroup that consumes it, refilling a slot once that warpgroup has arrived on its
  "consumed" barrier.  With zb, each compute warpgroup adds it to (and LayerNorms) its own
  64-row half in place, and both meet at a barrier before the first wgmma.  Each warpgroup
  stores its (128 x hc) result through its own staging tile, waiting for its previous store
  to have read it; with ``staging_halves=1`` the tile holds 64 rows and the two halves go
  out in turn (16 KiB less shared memory at hc=64, which C=384 with LayerNorm needs).

  refs as ``_expand_kernel``'s, except b1_gmem: (E // hc, hc) f32."""
  zb_gmem, w1t_gmem, b1_gmem, mask_gmem, h_gmem = _expand_refs(refs, has_zb, row_mask,
                                                                normalize)
  dtype = z_gmem.dtype
  n_cb, _, cb = w1t_gmem.shape
  n_chunks = e // hc
  per_wg = n_chunks // 2
  n_slots = 2 * slots
  r0 = lax.axis_index("m") * WS_BLOCK_M
  n_tile_bars = 2 * n_cb + has_zb + 2 * row_mask

  def slot_of(j):  # the W1^T slot of hidden slice j: its warpgroup's (j // 2) % slots-th
    return lax.rem(j, 2) * slots + lax.rem(lax.div(j, 2), slots)

  def body(z_smem, w_smem, b1_smem, h_smem, tile_bars, w_bars, b1_bars, consumed, *extra):
    extra = list(extra)
    ready = extra.pop(0) if has_zb else None
    zb_smem = extra.pop(0) if has_zb else None
    mask_smem = extra.pop(0) if row_mask else None

    def _compute(wgi):
      for i in range(n_tile_bars):
        plgpu.barrier_wait(tile_bars.at[i])
      if has_zb:  # this warpgroup's half of the tile, then wait for the other's
        _normalise_in_place([z_smem.at[b, wgi] for b in range(n_cb)], zb_smem,
                            normalize=normalize, eps=eps)
        plgpu.barrier_arrive(ready.at[0])
        plgpu.barrier_wait(ready.at[0])

      @pl.loop(0, per_wg)
      def _slice(k):
        j = 2 * k + wgi
        slot = wgi * slots + lax.rem(k, slots)
        for b in range(n_cb):
          plgpu.barrier_wait(w_bars.at[slot * n_cb + b])
        plgpu.barrier_wait(b1_bars.at[slot])

        def mm(acc0, acc1):
          for r, acc in enumerate((acc0, acc1)):
            for b in range(n_cb):
              plgpu.wgmma(acc, z_smem.at[b, r], w_smem.at[slot, b].transpose((1, 0)))
          plgpu.wgmma_wait(0)
          return acc0[...], acc1[...]

        accs = pl.run_scoped(mm, plgpu.ACC((64, hc), jnp.float32),
                             plgpu.ACC((64, hc), jnp.float32))
        hs = [_activate(a, b1_smem.at[slot], act, dtype,
                        mask_smem.at[r] if row_mask else None) for r, a in enumerate(accs)]
        plgpu.barrier_arrive(consumed.at[slot])  # the slot's W1^T and biases are read
        for r in range(2):
          tile = h_smem.at[wgi, r % staging_halves]
          if r % staging_halves == 0:  # our last store from these tiles has read them
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          tile[...] = hs[r]
          if r % staging_halves == staging_halves - 1:
            plgpu.commit_smem()
            for q in range(r + 1 - staging_halves, r + 1):
              plgpu.copy_smem_to_gmem(h_smem.at[wgi, q % staging_halves], h_gmem.at[
                  pl.ds(r0 + 64 * q, 64), pl.ds(j * hc, hc)])

      plgpu.wait_smem_to_gmem(0)

    def _memory():
      for b in range(n_cb):
        for r in range(2):
          plgpu.copy_gmem_to_smem(z_gmem.at[pl.ds(r0 + 64 * r, 64), pl.ds(b * cb, cb)],
                                  z_smem.at[b, r], tile_bars.at[2 * b + r])
      nbar = 2 * n_cb
      if has_zb:
        plgpu.copy_gmem_to_smem(zb_gmem, zb_smem, tile_bars.at[nbar])
        nbar += 1
      if row_mask:
        for r in range(2):
          plgpu.copy_gmem_to_smem(mask_gmem.at[pl.ds(r0 + 64 * r, 64)], mask_smem.at[r],
                                  tile_bars.at[nbar + r])

      def issue(j):
        slot = slot_of(j)
        for b in range(n_cb):
          plgpu.copy_gmem_to_smem(w1t_gmem.at[b, pl.ds(j * hc, hc)], w_smem.at[slot, b],
                                  w_bars.at[slot * n_cb + b])
        plgpu.copy_gmem_to_smem(b1_gmem.at[j], b1_smem.at[slot], b1_bars.at[slot])

      first = min(n_slots, n_chunks)
      for j in range(first):
        issue(j)
      if n_chunks > first:
        @pl.loop(first, n_chunks)
        def _refill(j):
          plgpu.barrier_wait(consumed.at[slot_of(j)])  # slice j - n_slots is done
          issue(j)
      # Observe the last slices' "consumed" phases too, so that every barrier phase this
      # warpgroup waits on is drained before the barriers are freed.
      for j in range(max(n_chunks - n_slots, 0), n_chunks):
        plgpu.barrier_wait(consumed.at[slot_of(j)])

    mosaic_mlp._warp_roles(_compute, _memory)

  t = _transforms(cb, dtype)
  pl.run_scoped(
      body,
      plgpu.SMEM((n_cb, 2, 64, cb), dtype, transforms=t),
      plgpu.SMEM((n_slots, n_cb, hc, cb), dtype, transforms=t),
      plgpu.SMEM((n_slots, hc), jnp.float32),
      plgpu.SMEM((2, staging_halves, 64, hc), dtype, transforms=_transforms(hc, dtype)),
      plgpu.Barrier(num_barriers=n_tile_bars),
      plgpu.Barrier(num_barriers=n_slots * n_cb),
      plgpu.Barrier(num_barriers=n_slots),
      plgpu.Barrier(num_arrivals=1, num_barriers=n_slots),
      *([plgpu.Barrier(num_arrivals=2, num_barriers=1)] if has_zb else []),
      *([plgpu.SMEM((n_cb, cb), jnp.float32)] if has_zb else []),
      *([plgpu.SMEM((2, 64), jnp.float32)] if row_mask else []),
      collective_axes="wg",
  )


def _project_kernel(h_gmem, res_gmem, rs_gmem, w2_gmem, b2_gmem, out_gmem, *, e: int,
                    kc: int, bn: int, stages: int, bm: int, select_zero_rows: bool = False):
  dtype = h_gmem.dtype
  rows = pl.ds(lax.axis_index("m") * bm, bm)
  cols = pl.ds(lax.axis_index("n") * bn, bn)

  def scoped(res_smem, rs_smem, b2_smem, bars):
    plgpu.copy_gmem_to_smem(res_gmem.at[rows, cols], res_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(rs_gmem.at[rows], rs_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(b2_gmem.at[cols], b2_smem, bars.at[2])

    def accumulate(acc_ref):
      def step(_, h_smem, w2_smem):
        plgpu.wgmma(acc_ref, h_smem, w2_smem)
        # Keep one wgmma in flight: this step's slots are released one step late
        # (delay_release=1), once the next step's wait has retired this wgmma.
        plgpu.wgmma_wait(1)

      plgpu.emit_pipeline(
          step,
          grid=(e // kc,),
          in_specs=[
              plgpu.BlockSpec((bm, kc), lambda k: (0, k), transforms=_transforms(kc, dtype),
                              delay_release=1),
              plgpu.BlockSpec((kc, bn), lambda k: (k, 0), transforms=_transforms(bn, dtype),
                              delay_release=1),
          ],
          max_concurrent_steps=stages,
      )(h_gmem.at[rows], w2_gmem.at[:, cols])
      plgpu.wgmma_wait(0)
      return acc_ref[...]

    acc = pl.run_scoped(accumulate, plgpu.ACC((bm, bn), jnp.float32))
    for b in range(3):
      plgpu.barrier_wait(bars.at[b])
    mosaic_mlp._residual_out(acc, b2_smem, rs_smem, res_smem, out_gmem.at[rows, cols],
                             select_zero_rows)

  pl.run_scoped(
      scoped,
      plgpu.SMEM((bm, bn), dtype, transforms=_transforms(bn, dtype)),
      plgpu.SMEM((bm,), jnp.float32),
      plgpu.SMEM((bn,), jnp.float32),
      plgpu.Barrier(num_barriers=3),
  )


def expand_call(z, zb, w1, b1, *, hc, cb, act, normalize, eps, stages, bm=BLOCK_M, staging=2,
                pipelined=False, bias_row_mask=None, ws_slots=0, ws_staging_halves=2,
                **params):
  """h = act(norm(z + zb) @ w1 + b1) for z with a multiple of ``bm`` rows (``_expand_kernel``);
  with ``bias_row_mask`` (M,) act(norm(z + zb) @ w1 + mask * b1).  ``zb`` None (only with
  normalize=False): h = act(z @ w1 + b1), no pass over the z tile.

  ``ws_slots`` > 0: the warp-specialised kernel (``_expand_kernel_ws``: bm must be 128, E a
  multiple of 2 hc) with that many W1^T slots per compute warpgroup and
  ``ws_staging_halves`` 64-row output staging tiles each; ``stages``, ``staging`` and
  ``pipelined`` do not apply to it."""
  m, c = z.shape
  e = w1.shape[1]
  dtype = z.dtype
  if zb is None and normalize:
    raise ValueError("expand_call: normalize=True needs zb")
  mask = [] if bias_row_mask is None else [bias_row_mask.astype(jnp.float32)]
  zbs = [] if zb is None else [zb.reshape(c // cb, cb)]
  w1t = w1.T.astype(dtype).reshape(e, c // cb, cb).transpose(1, 0, 2)
  if ws_slots:
    if bm != WS_BLOCK_M or e % (2 * hc) or m % bm:
      raise ValueError(f"the warp-specialised expand kernel needs bm={WS_BLOCK_M}, rows a "
                       f"multiple of it and E a multiple of 2 hc, got bm={bm}, M={m}, "
                       f"E={e}, hc={hc}")
    return plgpu.kernel(
        functools.partial(_expand_kernel_ws, e=e, hc=hc, act=act, normalize=normalize,
                          eps=float(eps), slots=ws_slots, row_mask=bool(mask),
                          has_zb=zb is not None, staging_halves=ws_staging_halves),
        out_type=jax.ShapeDtypeStruct((m, e), dtype),
        grid=(m // bm,), grid_names=("m",), num_threads=3, thread_name="wg", **params,
    )(z, *zbs, w1t, b1.astype(jnp.float32).reshape(e // hc, hc), *mask)
  return plgpu.kernel(
      functools.partial(_expand_kernel, e=e, hc=hc, act=act, normalize=normalize,
                        eps=float(eps), stages=stages, bm=bm, staging=staging,
                        pipelined=pipelined, row_mask=bool(mask), has_zb=zb is not None),
      out_type=jax.ShapeDtypeStruct((m, e), dtype),
      grid=(m // bm,), grid_names=("m",), **params,
  )(z, *zbs, w1t, b1.astype(jnp.float32), *mask)


def project_call(h, res, rs, w2, b2, *, bn, kc, stages, bm=BLOCK_M, select_zero_rows=False,
                 **params):
  """y = res + rs * (h @ w2 + b2) for h with a multiple of ``bm`` rows (``_project_kernel``);
  ``select_zero_rows``: exactly res where rs == 0, whatever h holds there."""
  m, e = h.shape
  c = w2.shape[1]
  return plgpu.kernel(
      functools.partial(_project_kernel, e=e, kc=kc, bn=bn, stages=stages, bm=bm,
                        select_zero_rows=select_zero_rows),
      out_type=jax.ShapeDtypeStruct((m, c), res.dtype),
      grid=(m // bm, c // bn), grid_names=("m", "n"), **params,
  )(h, res, rs, w2.astype(h.dtype), b2.astype(jnp.float32))


@_switches.jit(static_argnames=("act", "normalize", "eps", "hidden_chunk",
                                "block_n", "stages", "project_stages",
                                "col_block", "expand_block_m",
                                "project_block_m", "expand_pipelined",
                                "expand_ws_slots", "expand_gemm",
                                "project_gemm", "interpret"))
def split_mlp(z, res, w1, b1, w2, b2, *, z_bias=None, row_scale=None, act: str = "gelu",
              normalize: bool = True, eps: float = 1e-6, hidden_chunk: int | None = None,
              block_n: int | None = None, stages: int = 2, project_stages: int = 3,
              col_block: int | None = None, expand_block_m: int = BLOCK_M,
              project_block_m: int = BLOCK_M, expand_pipelined: bool = False,
              expand_ws_slots: int = 0, expand_gemm: bool = False,
              project_gemm: bool = False, interpret=False):
  """y = res + row_scale * (act(norm(z + z_bias) @ w1 + b1) @ w2 + b2) over rows, as
  ``mosaic_mlp.fused_mlp`` (same arguments and result), in two kernels.

  hidden_chunk: width of the expand kernel's W1 slices (None: 64, or 32 where 64 does
  not fit shared memory); stages / project_stages: TMA pipeline depth of each kernel;
  block_n: output channels per project CTA (None: the largest of
  256/192/128/64 dividing C); col_block: the expand kernel's column blocks of z and W1^T
  (its TMA copies and LayerNorm passes; None: likewise); expand_block_m / project_block_m:
  rows per CTA of each kernel, 64 or 128 (one warpgroup issuing two 64-row wgmmas per
  weight tile: each weight tile is read from L2 once per 128 rows instead of per 64).
  expand_pipelined: the expand kernel takes two hidden slices per pipeline step so that one
  slice's wgmmas run while the other's activation does (``_expand_kernel``; default slice:
  half the unpipelined one, so the weight stages take the same shared memory).  Compiled
  and correct on an H100 but slower: 14x14x384 0.214 vs 0.205 ms, 7x7x768 0.309 vs 0.217
  (batch 128, 2026-11-26, benchmarks.mosaic_pipelined); off by default.
  expand_ws_slots: > 0 runs the warp-specialised expand kernel (``_expand_kernel_ws``: 128
  rows per CTA, two compute warpgroups on alternate hidden slices of ``hidden_chunk``, this
  many W1^T slots each; ``expand_block_m``, ``stages`` and ``expand_pipelined`` do not apply
  to it; hidden_chunk None: 64, or 32 where 64 does not fit shared memory).
  expand_gemm: the expand as ``mosaic_gemm.expand`` instead (a K-streaming GEMM, 128 x 192
  output tiles, the LayerNorm in its epilogue from row statistics XLA computes first);
  hidden_chunk, stages, col_block, expand_block_m, expand_pipelined and expand_ws_slots do
  not apply to it.  Faster at C=768, slower at C=384 with LayerNorm (module docstring).
  project_gemm: the project as ``mosaic_gemm.project`` (128-row CTAs of two compute
  warpgroups + a TMA warpgroup, ``block_n`` wide, ``project_stages`` slots;
  project_block_m does not apply)."""
  m, c, e = mosaic_mlp.check_mlp_args(z, res, w1, b1, w2, b2)
  reason = unsupported_reason(m, c, e, z.dtype, stages)
  if reason is not None:
    raise NotImplementedError(f"split_mlp: {reason}")
  if act not in mosaic_mlp.ACTIVATIONS:
    raise ValueError(f"activation must be one of {mosaic_mlp.ACTIVATIONS}, got {act!r}")
  for name, v in (("expand_block_m", expand_block_m), ("project_block_m", project_block_m)):
    if v not in (64, 128):
      raise ValueError(f"{name} must be 64 or 128, got {v}")
  if expand_gemm and (expand_ws_slots or expand_pipelined):
    raise ValueError("expand_gemm, expand_ws_slots and expand_pipelined are three different "
                     "expand kernels: pick one")
  for on, flag, k_, n_ in ((expand_gemm, "expand_gemm", c, e),
                           (project_gemm, "project_gemm", e, c)):
    reason = mosaic_gemm.unsupported_reason(m, k_, n_, z.dtype) if on else None
    if reason is not None:
      raise NotImplementedError(f"split_mlp({flag}=True): {reason}")
  if expand_ws_slots:
    if expand_pipelined:
      raise ValueError("expand_ws_slots and expand_pipelined are two different expand "
                       "kernels: pick one")
    expand_block_m = WS_BLOCK_M
    if hidden_chunk is not None and e % (2 * hidden_chunk):
      raise ValueError(f"expand_ws_slots needs E={e} to be a multiple of 2 x hidden_chunk="
                       f"{2 * hidden_chunk}")
    tiles = choose_ws_tiles(c, e, expand_ws_slots, has_zb=True,
                            widths=(64, 32) if hidden_chunk is None else (hidden_chunk,))
    if tiles is None:
      raise ValueError(f"C={c}, E={e} with expand_ws_slots={expand_ws_slots} and "
                       f"hidden_chunk={hidden_chunk} does not fit the warp-specialised "
                       f"expand kernel's shared memory")
    hc, ws_halves = tiles
  else:
    hc = hidden_chunk or choose_hidden_chunk(c, stages, expand_block_m)
  if hc is None:
    raise ValueError(f"C={c} with expand_block_m={expand_block_m} and {stages} stages does "
                     f"not fit the expand kernel's shared memory")
  if expand_pipelined and hidden_chunk is None:
    hc //= 2
  step = 2 * hc if expand_pipelined else hc  # W1^T rows per pipeline stage
  if expand_pipelined and e % step:
    raise ValueError(f"expand_pipelined=True needs an even number of hidden slices: "
                     f"E={e}, hidden_chunk={hc}")
  bn = block_n or _column_block(c)
  cb = col_block or _column_block(c)
  for name, v, total in (("hidden_chunk", hc, e), ("block_n", bn, c), ("col_block", cb, c)):
    if v % 32 or total % v or v > 256:
      raise ValueError(f"{name}={v} must be a multiple of 32 dividing {total}, at most 256")
  if bn % 64:  # the project kernel's wgmma N / output tile: block_n=96 failed to lower on an
    # H100 ("Failed to infer a possible set of layouts", 2026-11-26)
    raise ValueError(f"block_n={bn} must be a multiple of 64 (64, 128, 192 or 256)")
  kc = 64
  if project_stages < 2:
    raise ValueError(f"project_stages must be >= 2 (one wgmma stays in flight), got "
                     f"{project_stages}")
  # (with ``step`` the staging tiles are counted 2 hc wide when pipelined: an overestimate)
  if not expand_ws_slots and expand_smem_bytes(c, step, stages, bm=expand_block_m,
                                               staging=1) > SMEM_BYTES:
    raise ValueError(f"hidden_chunk={hc} with {stages} stages and expand_block_m="
                     f"{expand_block_m}{' (two per stage)' if expand_pipelined else ''} does "
                     f"not fit shared memory")
  if project_smem_bytes(bn, kc, project_stages, bm=project_block_m) > SMEM_BYTES:
    raise ValueError(f"block_n={bn} with {project_stages} stages and project_block_m="
                     f"{project_block_m} does not fit shared memory")
  z, res, zb, rs = mosaic_mlp.row_inputs(
      z, res, z_bias, row_scale,
      max(expand_block_m, project_block_m,
          mosaic_gemm.BLOCK_M if expand_gemm or project_gemm else 0))
  m_pad = z.shape[0]
  params = dict(compiler_params=plgpu.CompilerParams(approx_math=True),
                interpret=_interpret_params(interpret))
  if expand_gemm:
    h = mosaic_gemm.expand(z, zb, w1, b1, act=act, normalize=normalize, eps=eps,
                           interpret=interpret)
  else:
    h = expand_call(z, zb, w1, b1, hc=hc, cb=cb, act=act, normalize=normalize, eps=eps,
                    stages=stages, bm=expand_block_m,
                    staging=choose_staging(c, step, stages, expand_block_m),
                    pipelined=expand_pipelined, ws_slots=expand_ws_slots,
                    ws_staging_halves=ws_halves if expand_ws_slots else 2, **params)
  if project_gemm:
    y = mosaic_gemm.project(h, w2, b2, res, rs, tn=bn, stages=project_stages,
                            interpret=interpret)
  else:
    y = project_call(h, res, rs, w2, b2, bn=bn, kc=kc, stages=project_stages,
                     bm=project_block_m, **params)
  return y[:m] if m_pad != m else y
