"""Group-width-8 3x3 convolution + bias + activation on tensor cores (one Mosaic GPU
kernel), and the MBConv and ConvFirst blocks / stages built on it (inference form).

Why: in ConvFirstNet's MBConv blocks XLA's group-width-8 conv on the 4C-wide hidden tensor
is about half of the block (14x14x384 E4, batch 128, H200 2026-11-26: 0.18 of 0.38 ms),
and the split Mosaic expand / project kernels could not beat XLA's block around it
(benchmarks/RESULTS.md, "The same split for MBConv").  A CUDA-core kernel would not beat it
either (72 multiply-adds per output at the ~15 T/s the depthwise conv kernel reaches is
XLA's time), so the taps go to wgmma with block-diagonal weights.

**Layout: padded, image-interleaved flat rows.**  The input is stored as rows of images
with one zero row (``hp = H + 1`` rows: it is the row above an image and the one below the
image before it) and one zero column (``wp = W + 1`` pixels per row: it ends one row and
starts the next), with 8 images
interleaved row by row: pixel (n, i, j) is row ``guard + 8 * ((n // 8 * hp + i + 1) * wp +
j + 1) + n % 8``, every other row is zero, plus ``guard >= 8 * (wp + 1)`` zero rows before
and after.  Then the input of tap (dy, dx) for any block of output rows is the block
shifted by ``8 * (dy * wp + dx)`` rows: a multiple of 8, so all nine taps are 8-row-aligned
slices of one shared-memory window (``block_m + 16 * (wp + 1)`` rows, TMA-loaded at an
aligned start), which is what a wgmma operand must be; every tap of a real pixel lands on
the same image or a zero row.  (A plain padded layout needs shifts by one row for dx =
+-1: Mosaic GPU's TMA copies into tiled shared memory refuse row starts that are not
multiples of the 8-row tile -- "AssertionError" in its layout inference, 2026-11-26.)
Per CTA (``block_m`` rows x ``chunk`` channels): one window, the 9 taps' (chunk x chunk)
block-diagonal weight tiles and the bias by TMA, 9 wgmmas into one float32 accumulator,
bias + activation in registers, one TMA store.  Rows off the real pixels produce finite
garbage, dropped by ``from_padded_rows`` or zeroed by the MBConv project kernel's row mask.

Measured (H100, batch 128, bf16, 2026-11-27, benchmarks/RESULTS.md): the conv 0.109-0.116
ms vs XLA's 0.215-0.221 at 14x14x1536; an MBConv block in the layout 0.331-0.340 vs XLA's
0.380-0.398 ms at 14x14x384, but 0.41-0.44 vs 0.25 at 7x7x768 (then 1.55 rows per pixel);
the 9-block 14x14x384 stage 2.73 vs 3.36 ms with this layout (1.17 rows per pixel).
``pallas_kernels.mbconv_stage`` picks it by rows per pixel (``row_overhead``).  ConvFirst
stages (``convfirst_stage_forward``: this conv with its bias, then the fused MLP kernel
with the row mask), H100 2026-11-27, three blocks, batch 128: 56x56x96 1.127 ms vs 1.299
with XLA's conv per block and XLA's 2.349; 28x28x192 0.730 vs 0.685 / 1.154 (so
``pallas_kernels.convfirst_stage`` under None takes the layout at C <= 128 only).

Cost: with 32-channel chunks the block-diagonal tiles do 4x the real multiply-adds
(14x14x1536, batch 128: ~22 GFLOP executed); each input row is read from L2 about
(block_m + 16 (wp + 1)) / block_m times (2x at 14x14 with 256-row CTAs), and the layout's
extra rows cost ``row_overhead`` (1.17x at 14x14, batch 128).  The conv runs at about twice
its DRAM floor; a pipelined form (``per_cta``) was slower at 14x14.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _switches, mosaic_gemm, mosaic_mlp, mosaic_split
from pallas_kernels.convfirst_block.mosaic import default_mlp_block_m
from pallas_kernels.convfirst_block.pallas_triton import block_diagonal_conv_weight
from pallas_kernels.convfirst_block.reference import (
    GROUP_WIDTH,
    ConvFirstBlockParams,
    MBConvBlockParams,
    _check,
    grouped_conv,
)
from pallas_kernels.mosaic_mlp import _activate, _interpret_params, _transforms

KERNEL_SIZE = 3
ACTIVATIONS = ("silu", "identity")


class PaddedRows(NamedTuple):
  """The padded, image-interleaved flat-row layout of an (n, h, w) batch (module
  docstring)."""

  n: int
  h: int
  w: int
  hp: int          # image rows with the zero row: h + 1
  wp: int          # row length: w + 1 (one zero column, shared by neighbouring rows)
  rows: int        # rows of the image groups: 8 * ceil(n / 8) * hp * wp, rounded up to
                   # ``multiple``
  guard: int       # zero rows before and after them: >= 8 * (wp + 1), a multiple of 256
                   # (so every kernel's CTAs tile the guards too)

  @property
  def total(self) -> int:
    return self.rows + 2 * self.guard

  @property
  def inner(self) -> slice:
    """The rows of the image groups within the ``total`` rows."""
    return slice(self.guard, self.guard + self.rows)


def padded_rows(n: int, h: int, w: int, multiple: int = 256) -> PaddedRows:
  hp, wp = h + 1, w + 1
  rows = -(-(-(-n // 8) * 8 * hp * wp) // multiple) * multiple
  return PaddedRows(n, h, w, hp, wp, rows, -(-8 * (wp + 1) // 256) * 256)


def row_mask(layout: PaddedRows) -> jax.Array:
  """(layout.total,) float32: 1 at the rows of real pixels, 0 elsewhere."""
  ones = jnp.ones((layout.n, layout.h, layout.w, 1), jnp.float32)
  return to_padded_rows(ones, layout)[:, 0]


def to_padded_rows(x: jax.Array, layout: PaddedRows) -> jax.Array:
  """(n, h, w, c) -> (layout.total, c)."""
  n, h, w, c = x.shape
  if (n, h, w) != layout[:3]:
    raise ValueError(f"x of shape {x.shape} does not match the layout {layout}")
  n8 = -(-n // 8)
  xp = jnp.pad(x, ((0, 8 * n8 - n), (1, 0), (1, 0), (0, 0)))
  xp = xp.reshape(n8, 8, layout.hp, layout.wp, c).transpose(0, 2, 3, 1, 4).reshape(-1, c)
  tail = layout.rows - xp.shape[0] + layout.guard
  return jnp.pad(xp, ((layout.guard, tail), (0, 0)))


def from_padded_rows(y: jax.Array, layout: PaddedRows) -> jax.Array:
  """(layout.total, c) rows -> (n, h, w, c): the rows of real pixels."""
  n, h, w, hp, wp = layout.n, layout.h, layout.w, layout.hp, layout.wp
  if y.shape[0] != layout.total:
    raise ValueError(f"expected {layout.total} rows for {layout}, got {y.shape[0]}")
  n8 = -(-n // 8)
  y = y[layout.guard:layout.guard + n8 * 8 * hp * wp].reshape(n8, hp, wp, 8, -1)
  return y.transpose(0, 3, 1, 2, 4).reshape(8 * n8, hp, wp, -1)[:n, 1:h + 1, 1:w + 1]


def unsupported_reason(x_shape, kernel_shape, dtype, chunk: int = 32) -> str | None:
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return (f"the Mosaic grouped conv takes bfloat16/float16 activations (wgmma operands), "
            f"got {jnp.dtype(dtype).name}")
  if len(x_shape) != 4:
    return f"expects NHWC input of rank 4, got shape {tuple(x_shape)}"
  c = x_shape[-1]
  if tuple(kernel_shape) != (KERNEL_SIZE, KERNEL_SIZE, GROUP_WIDTH, c):
    return (f"only 3x3 group-width-{GROUP_WIDTH} kernels of shape (3, 3, 8, {c}) are "
            f"supported, got {tuple(kernel_shape)}")
  if chunk not in (32, 64) or c % chunk:
    return f"C={c} must be a multiple of the channel chunk {chunk} (32 or 64)"
  return None


def _conv_taps(x_smem, w_smem, wp: int, bm: int):
  """The (bm, cc) float32 conv of a window: tap (dy, dx) is the window's slice at
  8 (dy wp + dx) times its (cc x cc) block-diagonal tile, 9 wgmmas into one accumulator."""
  def taps(acc_ref):
    for dy in range(3):
      for dx in range(3):
        plgpu.wgmma(acc_ref, x_smem.at[pl.ds(8 * (dy * wp + dx), bm)], w_smem.at[dy * 3 + dx])
    plgpu.wgmma_wait(0)
    return acc_ref[...]

  return pl.run_scoped(taps, plgpu.ACC((bm, w_smem.shape[-1]), jnp.float32))


def _kernel(x_gmem, w_gmem, b_gmem, out_gmem, *, wp: int, bm: int, cc: int, act: str):
  """x_gmem: (total, C) padded interleaved rows; w_gmem: (C // cc, 9, cc, cc) block-diagonal
  tap tiles (K = input channel, N = output channel within the chunk); b_gmem: (C,) f32.
  Output rows [r0, r0 + bm) are act(conv + bias); their window starts 8 (wp + 1) rows
  earlier (a multiple of 8), and tap (dy, dx) is its slice at 8 ((dy + 1) wp + dx + 1).
  The CTAs over the guard rows clamp their window into the array (their rows, like the
  border rows, come out finite but meaningless)."""
  dtype = x_gmem.dtype
  total = x_gmem.shape[0]
  r0 = lax.axis_index("m") * bm
  chunk = lax.axis_index("c")
  cols = pl.ds(chunk * cc, cc)
  win = bm + 16 * (wp + 1)
  start = jnp.clip(r0 - 8 * (wp + 1), 0, total - win)

  def scoped(x_smem, w_smem, b_smem, o_smem, bars):
    plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(start, win), cols], x_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(w_gmem.at[chunk], w_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(b_gmem.at[cols], b_smem, bars.at[2])
    for i in range(3):
      plgpu.barrier_wait(bars.at[i])

    o_smem[...] = _activate(_conv_taps(x_smem, w_smem, wp, bm), b_smem, act, dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[pl.ds(r0, bm), cols])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(
      scoped,
      plgpu.SMEM((win, cc), dtype, transforms=_transforms(cc, dtype)),
      plgpu.SMEM((9, cc, cc), dtype, transforms=_transforms(cc, dtype)),
      plgpu.SMEM((cc,), jnp.float32),
      plgpu.SMEM((bm, cc), dtype, transforms=_transforms(cc, dtype)),
      plgpu.Barrier(num_barriers=3),
  )


def _kernel_pipelined(x_gmem, w_gmem, b_gmem, out_gmem, *, wp: int, bm: int, cc: int,
                      act: str, per_cta: int, stages: int, staging: int = 2):
  """``_kernel`` for ``per_cta`` consecutive channel chunks per CTA, pipelined: the next
  chunks' windows, tap tiles and biases load (TMA, ``stages`` deep) while a chunk's wgmmas
  run, and each chunk's result leaves through one of ``staging`` tiles without waiting for
  the previous store.  w_gmem: (C // cc * 9, cc, cc)."""
  dtype = x_gmem.dtype
  total = x_gmem.shape[0]
  r0 = lax.axis_index("m") * bm
  c0 = lax.axis_index("c") * per_cta * cc        # first channel of this CTA
  win = bm + 16 * (wp + 1)
  start = jnp.clip(r0 - 8 * (wp + 1), 0, total - win)

  def scoped(o_smem):
    def step(idx, x_smem, w_smem, b_smem):
      (k,) = idx

      y = _activate(_conv_taps(x_smem, w_smem, wp, bm), b_smem, act, dtype)
      slot = lax.rem(k, staging)
      plgpu.wait_smem_to_gmem(staging - 1, wait_read_only=True)
      o_smem.at[slot][...] = y
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[slot],
                              out_gmem.at[pl.ds(r0, bm), pl.ds(c0 + k * cc, cc)])

    plgpu.emit_pipeline(
        step,
        grid=(per_cta,),
        in_specs=[
            plgpu.BlockSpec((win, cc), lambda k: (0, k), transforms=_transforms(cc, dtype)),
            plgpu.BlockSpec((9, cc, cc), lambda k: (k, 0, 0), transforms=_transforms(cc, dtype)),
            plgpu.BlockSpec((cc,), lambda k: (k,)),
        ],
        max_concurrent_steps=stages,
    )(x_gmem.at[pl.ds(start, win), pl.ds(c0, per_cta * cc)],
      w_gmem.at[pl.ds(c0 // cc * 9, per_cta * 9)], b_gmem.at[pl.ds(c0, per_cta * cc)])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(scoped, plgpu.SMEM((staging, bm, cc), dtype, transforms=_transforms(cc, dtype)))


def grouped_conv_rows(xr: jax.Array, kernel: jax.Array, bias: jax.Array, layout: PaddedRows,
                      *, act: str = "silu", chunk: int = 32, block_m: int = 256,
                      per_cta: int = 0, stages: int = 2, interpret=False) -> jax.Array:
  """act(gconv(x) + bias) on padded flat rows: (layout.total, C) -> (layout.total, C); the
  rows of real pixels are exact, the others finite but meaningless (the MBConv project
  kernel's row mask zeroes them).  ``xr`` must be zero off the real pixels.

  per_cta: 0 = one channel chunk per CTA (``_kernel``); n = n consecutive chunks per CTA,
  their loads pipelined ``stages`` deep (``_kernel_pipelined``)."""
  if act not in ACTIVATIONS:
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
  if block_m not in (64, 128, 256):
    raise ValueError(f"block_m must be 64, 128 or 256, got {block_m}")
  # CTAs within 8 (wp + 1) rows of either end clamp their windows into the array, which
  # shifts their taps: harmless only while they hold guard rows alone, i.e. while the guard
  # (>= 8 (wp + 1) rows) is a multiple of block_m -- always here (a multiple of 256).
  # 512-row CTAs broke it at 28x28 and 14x14 (guard 256) on an H100, 2026-11-27: the last
  # CTA held real pixels.
  if layout.guard % block_m:
    raise ValueError(f"block_m={block_m} must divide the layout's guard of {layout.guard} "
                     f"rows")
  total, c = xr.shape
  if total != layout.total:
    raise ValueError(f"expected {layout.total} padded rows for {layout}, got {total}")
  if per_cta < 0 or (per_cta and (c // chunk) % per_cta):
    raise ValueError(f"per_cta={per_cta} must divide the {c // chunk} channel chunks")
  if per_cta and stages < 1:
    raise ValueError(f"stages must be >= 1, got {stages}")
  w = block_diagonal_conv_weight(kernel, chunk, c, xr.dtype)        # (9, C, chunk)
  w = w.reshape(9, c // chunk, chunk, chunk).transpose(1, 0, 2, 3)   # (C//chunk, 9, K, N)
  if per_cta:
    body = functools.partial(_kernel_pipelined, wp=layout.wp, bm=block_m, cc=chunk, act=act,
                             per_cta=per_cta, stages=stages)
    w = w.reshape(c // chunk * 9, chunk, chunk)
    grid = (total // block_m, c // chunk // per_cta)
  else:
    body = functools.partial(_kernel, wp=layout.wp, bm=block_m, cc=chunk, act=act)
    grid = (total // block_m, c // chunk)
  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((total, c), xr.dtype),
      grid=grid, grid_names=("m", "c"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret),
  )(xr, w, bias.astype(jnp.float32))


@_switches.jit(static_argnames=("act", "chunk", "block_m", "per_cta", "stages",
                                "interpret"))
def grouped_conv_act(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, act: str = "silu",
                     chunk: int = 32, block_m: int = 256, per_cta: int = 0, stages: int = 2,
                     interpret=False) -> jax.Array:
  """act(grouped_conv_3x3(x, kernel) + bias) for NHWC ``x`` (bfloat16/float16), kernel
  (3, 3, 8, C), bias (C,), "same" padding, stride 1; float32 accumulation, result in
  x.dtype.  Pads x into the padded-row layout, runs the kernel, drops the border rows."""
  reason = (mosaic_mlp.device_unsupported_reason(bool(interpret))
            or unsupported_reason(x.shape, kernel.shape, x.dtype, chunk))
  if reason is not None:
    raise NotImplementedError(f"mosaic_gconv.grouped_conv_act: {reason}")
  if tuple(bias.shape) != (x.shape[-1],):
    raise ValueError(f"bias must be ({x.shape[-1]},), got {tuple(bias.shape)}")
  n, h, w, _ = x.shape
  layout = padded_rows(n, h, w)
  y = grouped_conv_rows(to_padded_rows(x, layout), kernel, bias, layout, act=act,
                        chunk=chunk, block_m=block_m, per_cta=per_cta, stages=stages,
                        interpret=interpret)
  return from_padded_rows(y, layout)


def grouped_conv_act_reference(x, kernel, bias, *, act: str = "silu"):
  """The same in XLA, float32 accumulation, result in x.dtype."""
  y = grouped_conv(x.astype(jnp.float32), kernel.astype(jnp.float32)) + bias
  if act == "silu":
    y = jax.nn.silu(y)
  return y.astype(x.dtype)


# ----------------------------------------------------------------- the MBConv block on it


def mbconv_unsupported_reason(x_shape, params: MBConvBlockParams, dtype,
                              chunk: int = 32) -> str | None:
  """Why ``mbconv_forward`` cannot run this call (None: it can)."""
  n, h, w, c = x_shape
  e = params.fc1_kernel.shape[-1]
  return (mosaic_split.unsupported_reason(n * h * w, c, e, dtype)
          or unsupported_reason((n, h, w, e), params.conv_kernel.shape, dtype, chunk))


def _project_tile(c: int) -> tuple[int, int]:
  """(rows, channels) per project CTA: 128 x 192 where 192 divides C (the ConvNeXt split
  form's measured choice, ``convnext_block.tuning._project_tile``), else 64 x the widest
  column block."""
  return (128, 192) if c % 192 == 0 else (64, mosaic_split._column_block(c))


# W1^T slots per compute warpgroup of the warp-specialised expand kernel
# (``mosaic_split._expand_kernel_ws``) in MBConv blocks, where it fits shared memory (C=384:
# yes, one 64-wide slice per warpgroup; C=768: no); 0 = the single-warpgroup kernel.  H100,
# 2026-11-27, 14x14x384 E4 in the layout: expand 0.117 vs 0.133 ms (batch 128), 0.204 vs
# 0.247 (256); the 9-block stage 2.576 vs 2.720 ms, 4.691 vs 5.023 (2 slots of 32-wide
# slices: 2.840 / 5.250, slower).
EXPAND_WS_SLOTS = 1
# MBConv expands run mosaic_gemm.py's K-streaming GEMM by default when compiled
# (``_mbconv_expand``'s ``gemm=None``).  With its persistent CTAs (H100, 2026-11-28, eleventh
# session) it beat the warp-specialised expand at C=384 too: the 9-block 14x14x384 stage
# 2.316 vs 2.435 ms (batch 128), 4.313 vs 4.532 (256); before that it ran only where the
# warp-specialised kernel does not fit (C=768).
EXPAND_GEMM = True
# MBConv projects as mosaic_gemm.py's GEMM by default when compiled (``mbconv_rows``'s
# ``project_gemm=None``): the 9-block 14x14x384 stage 2.464 vs 2.491 ms (batch 128), 4.576
# vs 4.662 (256); convfirst_t inference at batch 256 26,933 vs 26,575 img/s back to back
# (H100, 2026-11-28).  A small gain; ConvNeXt's blocks tied, so its table keeps the other.
PROJECT_GEMM = True


def _mbconv_expand(xr, params: MBConvBlockParams, mask, expand_block_m: int | None,
                   ws_slots: int | None, kw: dict, gemm: bool | None = None) -> jax.Array:
  """h = silu(x @ W1 + mask * b1) on the padded rows: the warp-specialised expand kernel
  with ``ws_slots`` W1^T slots per compute warpgroup (None: ``EXPAND_WS_SLOTS`` where that
  fits shared memory, else 0; 0 in the interpreter), or (0) the single-warpgroup one with
  ``expand_block_m`` rows per CTA (None: 128 where they fit shared memory).  ``gemm``: the
  K-streaming GEMM of mosaic_gemm.py instead (rows a multiple of 128); None: where neither
  ``ws_slots`` nor ``expand_block_m`` is given and the kernel is compiled (``EXPAND_GEMM``;
  silu expand with persistent CTAs, H100 2026-11-28, ms at batch 128 / 256: 7x7x768 0.068 /
  0.125 vs 0.132 / 0.253 for the single-warpgroup kernel, 14x14x384 0.084 / 0.161 vs
  0.129 / 0.183 for the warp-specialised one)."""
  c, e = params.fc1_kernel.shape
  if gemm is None:
    gemm = (EXPAND_GEMM and ws_slots is None and expand_block_m is None
            and kw.get("interpret") is None
            and xr.shape[0] % mosaic_gemm.BLOCK_M == 0
            and mosaic_gemm.unsupported_reason(xr.shape[0], c, e, xr.dtype) is None)
  if gemm:
    return mosaic_gemm.expand(xr, None, params.fc1_kernel, params.fc1_bias, act="silu",
                              normalize=False, bias_row_mask=mask,
                              interpret=kw.get("interpret"))
  common = dict(cb=mosaic_split._column_block(c), act="silu", normalize=False, eps=1e-6,
                stages=2, bias_row_mask=mask, **kw)
  if ws_slots is None:
    # Not by default in the interpreter: its compute warpgroups wait at once on loads the
    # TMA warpgroup issues, the pattern that hung the interpreted resident MLP kernel on a
    # 2-core machine (warpgroups blocked in barrier_wait holding the host threads the
    # issuing warpgroup needs); the explicit-slot tests still interpret it.
    ws_slots = EXPAND_WS_SLOTS if (expand_block_m is None and EXPAND_WS_SLOTS
                                   and kw.get("interpret") is None and (
        mosaic_split.choose_ws_tiles(c, e, EXPAND_WS_SLOTS, row_mask=True))) else 0
  if ws_slots:
    tiles = mosaic_split.choose_ws_tiles(c, e, ws_slots, row_mask=True)
    if tiles is None:
      raise ValueError(f"C={c}, E={e} with expand_ws_slots={ws_slots} does not fit the "
                       f"warp-specialised expand kernel's shared memory")
    return mosaic_split.expand_call(xr, None, params.fc1_kernel, params.fc1_bias,
                                    hc=tiles[0], bm=mosaic_split.WS_BLOCK_M,
                                    ws_slots=ws_slots, ws_staging_halves=tiles[1], **common)
  if expand_block_m is None:  # 128 rows where they fit shared memory (C=384: expand 0.140
    # vs 0.149 ms at 14x14, batch 128; the 9-block stage 2.775 vs 2.837 ms, H100 2026-11-27)
    expand_block_m = 128 if mosaic_split.choose_hidden_chunk(c, 2, 128) else 64
  hc = mosaic_split.choose_hidden_chunk(c, 2, expand_block_m)
  if hc is None:
    raise ValueError(f"C={c} with expand_block_m={expand_block_m} does not fit the expand "
                     f"kernel's shared memory")
  return mosaic_split.expand_call(
      xr, None, params.fc1_kernel, params.fc1_bias, hc=hc, bm=expand_block_m,
      staging=mosaic_split.choose_staging(c, hc, 2, expand_block_m), **common)


def mbconv_rows(xr: jax.Array, params: MBConvBlockParams, layout: PaddedRows, mask: jax.Array,
                *, chunk: int = 32, gconv_block_m: int = 256, gconv_per_cta: int = 0,
                gconv_stages: int = 2, expand_block_m: int | None = None,
                expand_ws_slots: int | None = None, expand_gemm: bool | None = None,
                project_gemm: bool | None = None, interpret=False) -> jax.Array:
  """The MBConv block x + fc2(silu(gconv(silu(fc1(x) + b1)) + b0)) + b2 on padded rows:
  (layout.total, C) -> (layout.total, C), zero at every row that is not a real pixel, so a
  stage of blocks can chain in the layout.  ``mask`` = ``row_mask(layout)``.

  Three kernels over all ``layout.total`` rows: the expand (``_mbconv_expand``'s rule:
  mosaic_gemm.py's GEMM by default when compiled, ``expand_gemm``; else the split kernel of
  ``mosaic_split``, its warp-specialised form where it fits, ``EXPAND_WS_SLOTS``, unless
  ``expand_block_m`` asks for the single-warpgroup one or ``expand_ws_slots`` says
  otherwise) with its bias scaled by the row mask, so rows off the pixels (x = 0) give
  silu(0) = 0 -- the conv's zero padding; the grouped conv kernel above; the project
  (mosaic_gemm.py's GEMM by default when compiled, ``project_gemm``, else the split
  kernel) with the row mask as its row scale, so rows off the pixels come out as their
  residual, 0.  The 4C-wide h and g each make one bf16 DRAM round
  trip."""
  c = xr.shape[1]
  kw = dict(compiler_params=plgpu.CompilerParams(approx_math=True),
            interpret=_interpret_params(interpret))
  hr = _mbconv_expand(xr, params, mask, expand_block_m, expand_ws_slots, kw, expand_gemm)
  g = grouped_conv_rows(hr, params.conv_kernel, params.conv_bias, layout, act="silu",
                        chunk=chunk, block_m=gconv_block_m, per_cta=gconv_per_cta,
                        stages=gconv_stages, interpret=interpret)
  bm, bn = _project_tile(c)
  # select_zero_rows: rows off the pixels come out exactly 0 even where g is not finite (g
  # there is computed from neighbouring pixels; a NaN image would otherwise reach the
  # image sharing its border rows in the next block).
  if project_gemm is None:
    project_gemm = (PROJECT_GEMM and kw["interpret"] is None
                    and xr.shape[0] % mosaic_gemm.BLOCK_M == 0)
  if project_gemm:
    return mosaic_gemm.project(g, params.fc2_kernel, params.fc2_bias, xr, mask,
                               tn=mosaic_gemm.choose_tiles(c, g.shape[1])[0],
                               select_zero_rows=True, interpret=kw["interpret"])
  return mosaic_split.project_call(g, xr, mask, params.fc2_kernel, params.fc2_bias, bn=bn,
                                   kc=64, stages=3, bm=bm, select_zero_rows=True, **kw)


def mbconv_forward(x: jax.Array, params: MBConvBlockParams, *, chunk: int = 32,
                   gconv_block_m: int = 256, interpret=False) -> jax.Array:
  """``mbconv_block_reference(x, params)`` (k = 3) through ``mbconv_rows``: x into the padded
  row layout, the three kernels, the real pixels out.  Raises NotImplementedError naming
  what it does not support (bfloat16/float16, C and E multiples of 64, k = 3)."""
  _check(x, params, params.fc1_kernel.shape[-1], "mosaic_gconv.mbconv_forward")
  return mbconv_stage_forward(x, (params,), chunk=chunk, gconv_block_m=gconv_block_m,
                              interpret=interpret)


def row_overhead(n: int, h: int, w: int) -> float:
  """Rows the layout's kernels process per real pixel (borders, guards, the last image
  group's padding images): ``padded_rows(n, h, w).total / (n h w)``."""
  return padded_rows(n, h, w).total / (n * h * w)


@_switches.jit(static_argnames=("chunk", "gconv_block_m", "gconv_per_cta",
                                "gconv_stages", "expand_block_m",
                                "expand_ws_slots", "expand_gemm",
                                "project_gemm", "interpret"))
def mbconv_stage_forward(x: jax.Array, params: tuple[MBConvBlockParams, ...], *,
                         chunk: int = 32, gconv_block_m: int = 256, gconv_per_cta: int = 0,
                         gconv_stages: int = 2, expand_block_m: int | None = None,
                         expand_ws_slots: int | None = None, expand_gemm: bool | None = None,
                         project_gemm: bool | None = None, interpret=False) -> jax.Array:
  """A chain of MBConv blocks (k = 3) through ``mbconv_rows``: x enters the padded-row layout
  once, every block runs in it (each block's output is the next one's input, zero off the
  pixels), and the real pixels come out once.  ``expand_gemm``, ``project_gemm``:
  ``mbconv_rows``'."""
  if not params:
    return x
  for p in params:
    _check(x, p, p.fc1_kernel.shape[-1], "mosaic_gconv.mbconv_stage_forward")
    reason = (mosaic_mlp.device_unsupported_reason(bool(interpret))
              or mbconv_unsupported_reason(x.shape, p, x.dtype, chunk))
    if reason is not None:
      raise NotImplementedError(f"mosaic_gconv.mbconv_stage_forward: {reason}")
  return _chain_in_layout(x, params, functools.partial(
      mbconv_rows, chunk=chunk, gconv_block_m=gconv_block_m, gconv_per_cta=gconv_per_cta,
      gconv_stages=gconv_stages, expand_block_m=expand_block_m,
      expand_ws_slots=expand_ws_slots, expand_gemm=expand_gemm, project_gemm=project_gemm,
      interpret=interpret))


def _chain_in_layout(x, params, block_rows):
  """x into the padded-row layout, ``block_rows(y, p, layout, mask)`` for each block's
  params in turn, the real pixels out."""
  n, h, w, _ = x.shape
  layout = padded_rows(n, h, w)
  mask = row_mask(layout)
  y = to_padded_rows(x, layout)
  for p in params:
    y = block_rows(y, p, layout, mask)
  return from_padded_rows(y, layout)


# ------------------------------------------------------------- the ConvFirst block on it


def convfirst_unsupported_reason(x_shape, params: ConvFirstBlockParams, dtype,
                                 chunk: int = 32, mlp_block_m: int = 64) -> str | None:
  """Why ``convfirst_rows`` / ``convfirst_stage_forward`` cannot run this call (None: it
  can): the grouped conv kernel's (bfloat16/float16, k = 3, C a multiple of ``chunk``) and
  the fused MLP kernel's (``mosaic_mlp.unsupported_reason``, with its shared memory at
  ``mlp_block_m`` rows)."""
  n, h, w, c = x_shape
  e = params.fc1_kernel.shape[-1]
  return (unsupported_reason(x_shape, params.conv_kernel.shape, dtype, chunk)
          or mosaic_mlp.unsupported_reason(padded_rows(n, h, w).total, c, e, dtype,
                                           block_m=mlp_block_m, stages=2))


def convfirst_rows(xr: jax.Array, params: ConvFirstBlockParams, layout: PaddedRows,
                   mask: jax.Array, *, chunk: int = 32, gconv_block_m: int = 256,
                   mlp_block_m: int | None = None, mlp_resident: bool | None = None,
                   interpret=False) -> jax.Array:
  """The ConvFirst block x + fc2(silu(fc1(gconv(x) + b0) + b1)) + b2 on padded rows:
  (layout.total, C) -> (layout.total, C), zero at every row that is not a real pixel, so a
  stage of blocks can chain in the layout (``xr`` must be zero there).

  Two kernels over all ``layout.total`` rows: the tensor-core grouped conv above (bias
  added, no activation; its zero padding is the layout's zero rows) and the fused MLP
  kernel (``mosaic_mlp.fused_mlp``, no normalisation) with the row mask as its row scale
  and ``select_zero_rows``, so rows off the pixels come out as their residual, 0, whatever
  the conv left there.  z (C wide) makes one DRAM round trip; the E-wide hidden tensor
  none.  In place of the NHWC form's XLA grouped conv (``convfirst_block.mosaic``)."""
  c = xr.shape[1]
  if mlp_block_m is None:
    mlp_block_m = default_mlp_block_m(c, params.fc1_kernel.shape[-1],
                                      jnp.dtype(xr.dtype).itemsize)
  z = grouped_conv_rows(xr, params.conv_kernel, params.conv_bias, layout, act="identity",
                        chunk=chunk, block_m=gconv_block_m, interpret=interpret)
  return mosaic_mlp.fused_mlp(z, xr, params.fc1_kernel, params.fc1_bias, params.fc2_kernel,
                              params.fc2_bias, row_scale=mask, act="silu", normalize=False,
                              block_m=mlp_block_m, select_zero_rows=True,
                              resident=mlp_resident, interpret=interpret)


@_switches.jit(static_argnames=("chunk", "gconv_block_m", "mlp_block_m",
                                "mlp_resident", "interpret"))
def convfirst_stage_forward(x: jax.Array, params: tuple[ConvFirstBlockParams, ...], *,
                            chunk: int = 32, gconv_block_m: int = 256,
                            mlp_block_m: int | None = None,
                            mlp_resident: bool | None = None, interpret=False) -> jax.Array:
  """A chain of ConvFirst blocks (k = 3) through ``convfirst_rows``: x enters the padded-row
  layout once, every block runs in it, and the real pixels come out once.  Raises
  NotImplementedError naming what it does not support."""
  if not params:
    return x
  for p in params:
    _check(x, p, x.shape[-1], "mosaic_gconv.convfirst_stage_forward")
    reason = (mosaic_mlp.device_unsupported_reason(bool(interpret))
              or convfirst_unsupported_reason(x.shape, p, x.dtype, chunk, mlp_block_m or (
                  default_mlp_block_m(x.shape[-1], p.fc1_kernel.shape[-1],
                                      jnp.dtype(x.dtype).itemsize))))
    if reason is not None:
      raise NotImplementedError(f"mosaic_gconv.convfirst_stage_forward: {reason}")
  return _chain_in_layout(x, params, functools.partial(
      convfirst_rows, chunk=chunk, gconv_block_m=gconv_block_m, mlp_block_m=mlp_block_m,
      mlp_resident=mlp_resident, interpret=interpret))
