"""The split form's two kernels as K-streaming, warp-specialised GEMMs (Mosaic GPU, Hopper).

    h = act(LN(z + zb) @ W1 + b1)        ``expand``   (M, E) in z's dtype
    y = res + row_scale * (h @ W2 + b2)  ``project``  (M, C)

The same two functions as ``mosaic_split``'s expand and project kernels, tiled as GEMMs
instead.  ``mosaic_split._expand_kernel`` keeps a CTA's whole (rows x C) z tile in shared
memory, LayerNorms it there and streams (hc x C) slices of W1^T past it, hc = 64 (32 at
C=768): every wgmma is 64 x hc x C with both operands in shared memory, which at N = 64
reads as many bytes per multiply-add as shared memory delivers, and a 64-row CTA fills an
SM's shared memory alone, so its bias + activation leave the tensor cores idle.  At C=384
/ 768 it ran at ~250 TFLOP/s while a plain GEMM of the same shape ran at 380-510
(H100, 2026-11-28, ``devtmp`` probe: expand 14x14x384 batch 128 0.13 ms vs 0.069-0.078).

Here a CTA owns a (128 x ``tn``) output tile and streams (64 x ``tk``) tiles of the left
operand and (``tk`` x ``tn``) tiles of the right one through ``stages`` shared-memory
slots: warpgroup 2 only issues the TMA copies, warpgroups 0 and 1 each multiply their
64-row half against the shared right tile (wgmma 64 x tn x tk, one kept in flight) and run
the epilogue on their (64 x tn) float32 accumulator.  The LayerNorm cannot be applied to
the left operand on its way into the tensor cores, so it moves to the epilogue:

    LN(z + zb) @ W1 = rstd * ((z + zb) @ W1 - mean * colsum(W1))
                    = rstd * (z @ W1 + zb @ W1) - rstd * mean * colsum(W1)

with mean and rstd of z + zb per row from one small XLA reduction over z before the kernel
(reads z once: 19 MB at 14x14x384, batch 128), and zb @ W1 and colsum(W1) computed from
the bfloat16 W1 the tensor cores see, in float32, so the identity holds to float32
rounding.  z enters the matmul as it is in DRAM (bfloat16) instead of normalised and
rounded to bfloat16 again, so this form rounds once less than ``mosaic_split``'s.  Its
float32 cancellation (acc - mean colsum) costs ~|mean| / std ulps of float32, negligible
unless a row's mean is ~1e4 of its spread.

With ``persistent`` (the default, ``PERSISTENT``) one CTA per SM walks the tiles
(``_kernel``): the TMA warpgroup's operand stream runs on across tile boundaries, so the
next tile's first slots fill during this tile's epilogue, and output tiles leave without a
wait for the store -- per tile, the pipeline fill and the store no longer idle the tensor
cores, though the two compute warpgroups still run their epilogues at the same time.
``persistent=False`` runs the same kernel with one CTA per tile.

Measured (H100, bf16, 2026-11-28, benchmarks/RESULTS.md), ms at batch 128 / 256, one CTA
per tile (measured with the earlier per-tile kernel, which differed only in its TMA
warpgroup loading the project's residual tile) -> persistent (``benchmarks.mosaic_gemm``,
one process): expand with LayerNorm +
GELU at 7x7x768 0.101 / 0.184 -> 0.087 / 0.157 (the split kernel 0.145 / 0.276), SiLU
0.086 / 0.150 -> 0.068 / 0.125; at 14x14x384 with LayerNorm 0.155 / 0.273 -> 0.131 /
0.212 (the warp-specialised split kernel 0.142 / 0.196), SiLU 0.108 / 0.201 -> 0.084 /
0.161 (0.129 / 0.183); the project at 7x7x768 0.072 / 0.104 -> 0.063 / 0.099, at 14x14x384
0.073 / 0.134 -> 0.071 / 0.125 (split 0.080 / 0.139).  XLA's plain GEMM of the same
shapes (no epilogue): expand 0.066 / 0.120 and 0.083 / 0.138, project 0.076 / 0.121 and
0.067 / 0.127.  Used by default (compiled only): the ConvNeXt H100 table's C=768 expand
(``mosaic_expand_gemm``; block forward 7x7x768 0.166 / 0.295 ms vs 0.189 / 0.333 with
one CTA per tile, XLA 0.276 / 0.518) and C=384 project (``mosaic_project_gemm``), and
MBConv blocks' expand and project (``mosaic_gconv.EXPAND_GEMM``, ``PROJECT_GEMM``).

The epilogue is what separates the expand from a plain GEMM (H100, 2026-11-28, twelfth
session, ms at 14x14x384, batch 128 / 256: identity 0.071 / 0.124, SiLU 0.088 / 0.156,
LayerNorm + GELU 0.117 / 0.206, the last with XLA's row-statistics pass; in another call
the identity 0.068 / 0.119 against jax's reference Hopper matmul
(``jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu``: 128 x 192 to 128 x 384 CTAs, with
and without 2-CTA multicast clusters) at 0.074-0.089 / 0.128-0.187 and XLA at 0.075 /
0.134 for the plain GEMM, so the main loop itself is at par). Deferring each tile's
epilogue into the next tile's main loop (each warpgroup keeping the previous accumulator
in registers and storing it in 32- or 64-column chunks between its wgmmas) was built and
measured in that session and not kept: 0.123-0.155 / 0.222-0.266 for LayerNorm + GELU at
192-wide tiles (the two accumulators take 192 of the 232 registers), 0.126-0.130 /
0.217-0.220 at 128, SiLU 0.083 / 0.148 at best (-6%), and slower at 7x7x768 (identity
0.066 -> 0.089; benchmarks/RESULTS.md). A ping-pong schedule (each 128 x tn tile owned by
one compute warpgroup, each warpgroup with its own ring of operand slots -- two at tn=128,
all shared memory allows -- filled by the one TMA warpgroup) was built and measured in the
same session and not kept either: even the identity ran 1.6-1.8x slower (0.112 / 0.199 ms
at 14x14x384), one warpgroup's wgmmas alone starving on a shallow ring. Left to try:
ping-pong with a TMA producer per ring, packed bfloat16x2 activations (half the MUFU
work), and the row statistics accumulated from the streamed z tiles instead of a separate
pass.

Limits: bfloat16/float16, rows a multiple of 128 (the wrappers pad), the contraction a
multiple of ``tk`` (64), the output width a multiple of ``tn`` (64..256, a multiple of 64),
at least two pipeline slots where there are two or more contraction steps.  Runs in the
Mosaic GPU interpreter (``interpret=True``); the models use it only when compiled (its
compute warpgroups wait on another warpgroup's loads, the pattern that hung the
interpreter on a 2-core machine inside a model forward; see mosaic_mlp.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_mlp
from pallas_kernels.mosaic_mlp import _WG, _activation, _interpret_params, _transforms

BLOCK_M = 128  # rows per CTA: two compute warpgroups of 64
TK = 64        # contraction per pipeline step
SMEM_BYTES = 227 * 1024
_TN_CHOICES = (256, 192, 128, 64)
# persistent=None: persistent CTAs (one per SM) walking the tiles, or one CTA per tile
PERSISTENT = True


def smem_bytes(tn: int, stages: int, itemsize: int = 2, tk: int = TK) -> int:
  """Shared memory of one CTA: ``stages`` slots of (128 x tk) and (tk x tn), two (64 x tn)
  output / residual tiles, two slots of the vectors; + 2 KiB for barriers and alignment."""
  return (itemsize * (stages * (BLOCK_M * tk + tk * tn) + BLOCK_M * tn)
          + 4 * 2 * (3 * tn + 2 * BLOCK_M) + 2048)


def choose_tiles(n: int, k: int, *, tn: int | None = None,
                 stages: int | None = None) -> tuple[int, int] | None:
  """(tn, stages): the widest output tile dividing ``n`` (at most 192 unless asked: 256 fits
  only two slots and ran slower, 0.143 / 0.117 vs 0.140 / 0.105 ms for the LayerNorm
  expand at 14x14x384 / 7x7x768, batch 128, H100 2026-11-28) with the deepest pipeline (at
  most 4, at most k / tk steps) that fits shared memory; None if none does."""
  for t in ([tn] if tn else [t for t in _TN_CHOICES if t <= 192]):
    if n % t:
      continue
    for s in ([stages] if stages else (4, 3, 2)):
      if smem_bytes(t, s) <= SMEM_BYTES:
        return t, max(min(s, k // TK), 1)  # (1 only where there is one step)
  return None


def unsupported_reason(m: int, k: int, n: int, dtype) -> str | None:
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return (f"the Mosaic GPU GEMM kernels take bfloat16/float16 activations (wgmma "
            f"operands), got {jnp.dtype(dtype).name}")
  if k % TK:
    return f"the contraction ({k}) must be a multiple of {TK}"
  if n % 64:
    return f"the output width ({n}) must be a multiple of 64"
  if m <= 0:
    return f"no rows (M={m})"
  return None


def _expand_epilogue(acc, colv_smem, rowv_smem, act: str):
  """The expand's output tile in float32 from its (64 x tn) accumulator: colv_smem (n_col,
  tn), rowv_smem (n_row, 64) or None (``_kernel``'s modes)."""
  rows, tn = acc.shape
  n_col = colv_smem.shape[0]

  def col(i):
    v = plgpu.load(colv_smem.at[i], layout=_WG.reduce(0))
    return lax.broadcast_in_dim(v, (rows, tn), [1])

  def row(i):
    v = plgpu.load(rowv_smem.at[i], layout=_WG.reduce(1))
    return lax.broadcast_in_dim(v, (rows, tn), [0])

  if n_col == 3:                 # LayerNorm: rstd * (acc + zb W1) - rstd mean colsum(W1) + b1
    h = row(0) * (acc + col(0)) - row(1) * col(1) + col(2)
  elif rowv_smem is not None:    # the bias scaled per row (a row mask)
    h = acc + row(0) * col(0)
  else:
    h = acc + col(0)
  return _activation(h, act)


def _kernel(a_gmem, b_gmem, colv_gmem, rowv_gmem, res_gmem, out_gmem, *, tn: int,
            stages: int, mode: str, act: str, select_zero_rows: bool, n_ctas: int):
  """(128 x tn) output tiles walked by ``n_ctas`` CTAs (grid axis "sm"; ``num_threads=3``,
  axis "wg"): CTA p owns tiles p, p + n_ctas, ... of the row-major (M / 128) x (N / tn) tile
  grid (n_ctas = the number of tiles: one CTA per tile).

  mode "expand": colv (3, N) = (zb @ W1, colsum W1, b1) and rowv (2, M) = (rstd,
  rstd * mean), out = act(rstd * (acc + colv0) - rowv1 * colv1 + colv2); or colv (1, N) =
  b1 (+ zb @ W1) and rowv None: out = act(acc + colv0); or colv (1, N) = b1 and rowv
  (1, M) = a row mask: out = act(acc + mask * b1).  mode "project": colv (1, N) =
  b2, rowv (1, M) = row_scale, res (M, N): out = res + row_scale * (acc + b2).  res_gmem is
  None in "expand".

  Warpgroup 2 only issues the TMA copies; warpgroups 0 and 1 each multiply their 64-row
  half of a tile against the shared right-operand tile (wgmma 64 x tn x 64, one kept in
  flight, a slot released one step late) and run the epilogue on their accumulator.

  The TMA warpgroup's operand stream runs on across tile boundaries (global step g = local
  tile i * k steps + k, slot g mod ``stages``), so it loads the next tile's first steps
  while the compute warpgroups run this tile's epilogue, and the output tiles leave by TMA
  without waiting (a warpgroup waits for its previous store to have read its staging tile
  only before writing the tile again).  The per-tile vectors (colv, rowv) have two slots,
  refilled once both compute warpgroups have released them (``vec_free``); the project's
  residual tile is loaded into the staging tile by its compute warpgroup itself, once the
  previous store has read it, during the first contraction step."""
  dtype = a_gmem.dtype
  m, k = a_gmem.shape
  n = out_gmem.shape[1]
  n_k = k // TK
  n_n = n // tn
  n_tiles = (m // BLOCK_M) * n_n
  per_cta = -(-n_tiles // n_ctas)
  n_col = colv_gmem.shape[0]
  n_row = rowv_gmem.shape[0] if rowv_gmem is not None else 0
  project = mode == "project"
  cta = lax.axis_index("sm")
  n_vec = 1 + 2 * bool(n_row)  # barriers per vector slot: colv, rowv's two 64-row halves

  def tile(i):
    t = cta + i * n_ctas
    return t, (t // n_n) * BLOCK_M, pl.ds(lax.rem(t, n_n) * tn, tn)

  def n_local():  # tiles of this CTA
    return (n_tiles - cta + n_ctas - 1) // n_ctas

  def body(a_smem, b_smem, out_smem, colv_smem, a_bars, b_bars, consumed, vec_bars,
           vec_free, *extra):
    rowv_smem = extra[0] if n_row else None
    res_bars = extra[-1] if project else None

    def _compute(wgi):
      @pl.loop(0, per_cta)
      def _tile(i):
        t, r0, cols = tile(i)
        rows = pl.ds(r0 + 64 * wgi, 64)
        vs = lax.rem(i, 2)

        @pl.when(t < n_tiles)
        def _():
          def mm(acc_ref):
            @pl.loop(0, n_k)
            def _step(kk):
              g = i * n_k + kk
              s = lax.rem(g, stages)
              plgpu.barrier_wait(a_bars.at[2 * s + wgi])
              plgpu.barrier_wait(b_bars.at[s])
              plgpu.wgmma(acc_ref, a_smem.at[s, wgi], b_smem.at[s])
              plgpu.wgmma_wait(1)  # the previous step's wgmma is done: release its slot

              @pl.when(kk > 0)
              def _():
                plgpu.barrier_arrive(consumed.at[lax.rem(g + stages - 1, stages)])

              if project:
                @pl.when(kk == 0)
                def _():  # the residual into the staging tile, once the last store read it
                  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                  plgpu.copy_gmem_to_smem(res_gmem.at[rows, cols], out_smem.at[wgi],
                                          res_bars.at[wgi])

            plgpu.wgmma_wait(0)
            plgpu.barrier_arrive(consumed.at[lax.rem(i * n_k + n_k - 1, stages)])
            return acc_ref[...]

          acc = pl.run_scoped(mm, plgpu.ACC((64, tn), jnp.float32))
          plgpu.barrier_wait(vec_bars.at[n_vec * vs])
          if n_row:
            plgpu.barrier_wait(vec_bars.at[n_vec * vs + 1 + wgi])
          if project:
            plgpu.barrier_wait(res_bars.at[wgi])
            mosaic_mlp._residual_out(acc, colv_smem.at[vs, 0], rowv_smem.at[vs, wgi, 0],
                                     out_smem.at[wgi], out_gmem.at[rows, cols],
                                     select_zero_rows, wait=False)
          else:
            h = _expand_epilogue(acc, colv_smem.at[vs],
                                 rowv_smem.at[vs, wgi] if n_row else None, act)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last store read the tile
            out_smem.at[wgi][...] = h.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wgi], out_gmem.at[rows, cols])
          plgpu.barrier_arrive(vec_free.at[vs])  # (after the stores that used them)

      plgpu.wait_smem_to_gmem(0)

    def _memory():
      @pl.loop(0, per_cta)
      def _tile(i):
        t, r0, cols = tile(i)
        vs = lax.rem(i, 2)

        @pl.when(t < n_tiles)
        def _():
          @pl.when(i >= 2)
          def _():
            plgpu.barrier_wait(vec_free.at[vs])  # tile i - 2 is done with slot vs

          plgpu.copy_gmem_to_smem(colv_gmem.at[:, cols], colv_smem.at[vs],
                                  vec_bars.at[n_vec * vs])
          if n_row:
            for r in range(2):
              plgpu.copy_gmem_to_smem(rowv_gmem.at[:, pl.ds(r0 + 64 * r, 64)],
                                      rowv_smem.at[vs, r], vec_bars.at[n_vec * vs + 1 + r])

          @pl.loop(0, n_k)
          def _issue(kk):
            g = i * n_k + kk
            s = lax.rem(g, stages)

            @pl.when(g >= stages)
            def _():
              plgpu.barrier_wait(consumed.at[s])  # step g - stages is done with slot s

            for r in range(2):
              plgpu.copy_gmem_to_smem(
                  a_gmem.at[pl.ds(r0 + 64 * r, 64), pl.ds(kk * TK, TK)], a_smem.at[s, r],
                  a_bars.at[2 * s + r])
            plgpu.copy_gmem_to_smem(b_gmem.at[pl.ds(kk * TK, TK), cols], b_smem.at[s],
                                    b_bars.at[s])

      # Observe the phases not yet waited on (the last steps' slot releases, the last two
      # tiles' vector releases), so that every arrival has landed before the CTA exits.
      total = n_local() * n_k
      for j in range(stages):
        g = total - stages + j

        @pl.when(g >= 0)
        def _():
          plgpu.barrier_wait(consumed.at[lax.rem(g, stages)])

      for j in range(2):
        i = n_local() - 2 + j

        @pl.when(i >= 0)
        def _():
          plgpu.barrier_wait(vec_free.at[lax.rem(i, 2)])

    mosaic_mlp._warp_roles(_compute, _memory)

  pl.run_scoped(
      body,
      plgpu.SMEM((stages, 2, 64, TK), dtype, transforms=_transforms(TK, dtype)),
      plgpu.SMEM((stages, TK, tn), dtype, transforms=_transforms(tn, dtype)),
      plgpu.SMEM((2, 64, tn), dtype, transforms=_transforms(tn, dtype)),
      plgpu.SMEM((2, n_col, tn), jnp.float32),
      plgpu.Barrier(num_barriers=2 * stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_barriers=2 * n_vec),
      plgpu.Barrier(num_arrivals=2, num_barriers=2),
      *([plgpu.SMEM((2, 2, n_row, 64), jnp.float32)] if n_row else []),
      *([plgpu.Barrier(num_barriers=2)] if project else []),
      collective_axes="wg",
  )


def _call(a, b, colv, rowv, res, *, n: int, tn: int, stages: int, mode: str, act: str,
          select_zero_rows: bool, out_dtype, persistent: bool, ctas: int | None, interpret):
  m = a.shape[0]
  n_tiles = (m // BLOCK_M) * (n // tn)
  n_ctas = max(1, min(ctas or mosaic_mlp._sm_count(), n_tiles)) if persistent else n_tiles
  return plgpu.kernel(
      functools.partial(_kernel, tn=tn, stages=stages, mode=mode, act=act,
                        select_zero_rows=select_zero_rows, n_ctas=n_ctas),
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(n_ctas,), grid_names=("sm",),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret),
  )(a, b, colv, rowv, res)


def _check_tiles(m: int, k: int, n: int, dtype, tn, stages, what: str,
                 ctas: int | None = None):
  reason = unsupported_reason(m, k, n, dtype)
  if reason is not None:
    raise NotImplementedError(f"mosaic_gemm.{what}: {reason}")
  if m % BLOCK_M:
    raise ValueError(f"mosaic_gemm.{what}: rows ({m}) must be a multiple of {BLOCK_M} (pad "
                     f"them)")
  if tn is not None and (tn % 64 or n % tn or tn > 256):
    raise ValueError(f"mosaic_gemm.{what}: tn={tn} must be a multiple of 64 dividing {n}, "
                     f"at most 256")
  if stages is not None and stages < 2:
    # a slot is released one step late (one wgmma stays in flight), so with one slot the
    # TMA warpgroup would wait for a release that waits for its next load
    raise ValueError(f"mosaic_gemm.{what}: stages must be >= 2, got {stages}")
  if ctas is not None and ctas < 1:
    raise ValueError(f"mosaic_gemm.{what}: ctas must be >= 1, got {ctas}")
  tiles = choose_tiles(n, k, tn=tn, stages=stages)
  if tiles is None:
    raise ValueError(f"mosaic_gemm.{what}: tn={tn}, stages={stages} do not fit shared "
                     f"memory ({SMEM_BYTES} bytes) for N={n}")
  return tiles


def row_stats(z, zb, eps: float):
  """(rstd, rstd * mean) of each row of z + zb in float32, in one pass over z: the sums
  of d and d^2 for d = z + zb - (z + zb)[:, :1] (shifted by each row's first element, so
  that a large common offset does not cancel)."""
  zf = z.astype(jnp.float32) + zb.astype(jnp.float32)
  d = zf - zf[:, :1]
  c = z.shape[1]
  s1 = d.sum(axis=1) * (1.0 / c)
  var = (d * d).sum(axis=1) * (1.0 / c) - s1 * s1
  mean = zf[:, 0] + s1
  rstd = lax.rsqrt(jnp.maximum(var, 0.0) + eps)
  return rstd, rstd * mean


def expand(z, zb, w1, b1, *, act: str = "gelu", normalize: bool = True, eps: float = 1e-6,
           bias_row_mask=None, tn: int | None = None, stages: int | None = None,
           persistent: bool | None = None, ctas: int | None = None, interpret=False):
  """h = act(norm(z + zb) @ w1 + b1): z (M, C) bfloat16/float16 with M a multiple of 128,
  w1 (C, E) (cast to z's dtype), zb (C,) or None, b1 (E,); h in z's dtype.  ``normalize``:
  a LayerNorm without affine (``eps``), applied in the epilogue (module docstring).
  ``bias_row_mask`` (M,): act(z @ w1 + mask * b1) instead (zb None, no normalisation), as
  ``mosaic_split.expand_call``'s, for rows that must give act(0) where z and mask are 0.
  ``persistent``: persistent CTAs walking the tiles (None: ``PERSISTENT``) or one CTA per
  tile; ``ctas``: how many persistent CTAs (None: one per SM, at most one per tile)."""
  m, c = z.shape
  e = w1.shape[1]
  if act not in mosaic_mlp.ACTIVATIONS:
    raise ValueError(f"activation must be one of {mosaic_mlp.ACTIVATIONS}, got {act!r}")
  if bias_row_mask is not None and (normalize or zb is not None):
    raise ValueError("mosaic_gemm.expand: bias_row_mask is for zb=None, normalize=False")
  persistent = PERSISTENT if persistent is None else bool(persistent)
  tn, stages = _check_tiles(m, c, e, z.dtype, tn, stages, "expand", ctas)
  w1b = w1.astype(z.dtype)
  w1f = w1b.astype(jnp.float32)
  hi = lax.Precision.HIGHEST
  c1 = (jnp.zeros((e,), jnp.float32) if zb is None
        else jnp.dot(zb.astype(jnp.float32), w1f, precision=hi))
  b1 = b1.astype(jnp.float32)
  if bias_row_mask is not None:
    if bias_row_mask.shape != (m,):
      raise ValueError(f"mosaic_gemm.expand: bias_row_mask must be ({m},), got "
                       f"{bias_row_mask.shape}")
    colv, rowv = b1[None], bias_row_mask.astype(jnp.float32)[None]
  elif normalize:
    if zb is None:
      zb = jnp.zeros((c,), jnp.float32)
    rstd, nm = row_stats(z, zb, eps)
    colv = jnp.stack([c1, w1f.sum(axis=0), b1])
    rowv = jnp.stack([rstd, nm])
  else:
    colv, rowv = (b1 + c1)[None], None
  return _call(z, w1b, colv, rowv, None, n=e, tn=tn, stages=stages, mode="expand", act=act,
               select_zero_rows=False, out_dtype=z.dtype, persistent=persistent, ctas=ctas,
               interpret=interpret)


def project(h, w2, b2, res, row_scale=None, *, tn: int | None = None,
            stages: int | None = None, select_zero_rows: bool = False,
            persistent: bool | None = None, ctas: int | None = None, interpret=False):
  """y = res + row_scale * (h @ w2 + b2): h (M, E) with M a multiple of 128, w2 (E, C),
  res (M, C) in h's dtype, row_scale (M,) or None (ones); y in res's dtype.
  ``select_zero_rows``: exactly res where row_scale == 0, whatever h holds there.
  ``persistent``, ``ctas``: as ``expand``'s."""
  m, e = h.shape
  c = w2.shape[1]
  persistent = PERSISTENT if persistent is None else bool(persistent)
  tn, stages = _check_tiles(m, e, c, h.dtype, tn, stages, "project", ctas)
  if res.shape != (m, c) or res.dtype != h.dtype:
    raise ValueError(f"mosaic_gemm.project: res must be {(m, c)} {h.dtype}, got {res.shape} "
                     f"{res.dtype}")
  rs = (jnp.ones((m,), jnp.float32) if row_scale is None
        else row_scale.astype(jnp.float32))
  return _call(h, w2.astype(h.dtype), b2.astype(jnp.float32)[None], rs[None], res, n=c,
               tn=tn, stages=stages, mode="project", act="identity",
               select_zero_rows=select_zero_rows, out_dtype=res.dtype,
               persistent=persistent, ctas=ctas, interpret=interpret)
