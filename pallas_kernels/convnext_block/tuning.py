"""Tile sizes for the fused ConvNeXt block kernels: a small table keyed by
(C, dtype, device kind; ``TABLE_ALIASES`` lets a device use another's measured entries),
a heuristic for anything not in it, and ``retune`` to time candidates on the user's GPU
and cache the winners in a JSON file (which takes precedence over both).

Why tiles shrink as C grows: the forward kernel holds a (pixels x C) float32 accumulator
plus the normalised (pixels x C) input in registers for the whole hidden-dimension loop.
The register file of an SM is 256 KiB; at C=768 a 64-pixel tile would need 192 KiB for
the accumulator alone and spill, so large C takes 16-32 pixel tiles and smaller hidden
chunks, small C takes 128-256 pixel tiles (fewer programs re-reading the weights from
L2, and tensor-core dots with M >= 64)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.timing import median_seconds


@dataclasses.dataclass(frozen=True)
class ConvNeXtTiles:
  # forward kernel: pixels per program, hidden chunk, warps, pipelining stages
  fwd_pixels: int = 64
  fwd_hidden: int = 64
  fwd_warps: int = 4
  fwd_stages: int = 1
  fwd_tile_w: int = 0  # max tile width (power of two); 0 = the image width rounded up
  # backward kernel A (recompute + MLP/LN backward -> dz)
  bwd_pixels: int = 32
  bwd_hidden: int = 32
  bwd_warps: int = 4
  bwd_tile_w: int = 0
  # fc1/fc2 weight gradients: "gemm" = kernel A also writes h and dh (x.dtype, 4C wide)
  # and XLA's GEMMs reduce over pixels; "pallas" = kernel W recomputes h/dh per hidden
  # chunk (no 4C tensor in DRAM, but it re-reads zn and g once per hidden chunk and runs
  # small dots: measured 1.0-11.7 ms alone on H100 at the ConvNeXt-T shapes, see
  # pallas_triton.py).
  wgrad: str = "gemm"
  # weight-gradient kernel W (fc1/fc2 grads): rows per step, hidden chunk, programs
  wgrad_rows: int = 64
  wgrad_hidden: int = 32
  wgrad_warps: int = 4
  wgrad_programs: int = 264  # ~2 per SM on H100
  # depthwise-conv backward kernel B: pixels x channels per program
  # (pixels x channels <= 4096 elements per float32 tensor: 256 x 64 spilled, 2026-11-24)
  dw_pixels: int = 128
  dw_channels: int = 32
  dw_warps: int = 4
  # largest power-of-two channel block used in the matmul kernels
  channel_block: int = 128
  # Forward kernel: "mosaic" = XLA depthwise conv + one Mosaic GPU kernel for LN + MLP +
  # residual (pallas_kernels/mosaic_mlp.py: bfloat16/float16, C % 32 == 0, C <= 256,
  # Hopper); "mosaic_split" = XLA depthwise conv + two Mosaic GPU kernels, LN + fc1 + GELU
  # and fc2 + residual, the hidden activation through DRAM (pallas_kernels/mosaic_split.py:
  # bfloat16/float16, C % 64 == 0, Hopper; for C > 256); "triton" = the whole block in
  # pallas_triton.forward.  Where the chosen Mosaic form cannot run (float32, other C,
  # non-Hopper GPU) the Triton kernel runs.
  fwd_kernel: str = "mosaic"
  mosaic_block_m: int = 64  # 64: one warpgroup per CTA; 128: two + a TMA warpgroup
  mosaic_hidden: int = 64   # "mosaic" only ("mosaic_split" picks 64 or 32 by shared memory)
  mosaic_stages: int = 3    # weight pipeline depth ("mosaic_split": of its expand kernel)
  mosaic_project_stages: int = 3  # "mosaic_split": pipeline depth of its project kernel
  # "mosaic_split": rows per project CTA (64, or 128: one warpgroup, two 64-row wgmmas per
  # weight tile, halving the W2 reads from L2) and its output channels (0: largest of
  # 256/192/128/64 dividing C).  H100 2026-11-26, C=384: 128 x 192 0.212 ms, 64 x 192 0.241.
  mosaic_project_block_m: int = 64
  mosaic_block_n: int = 0
  # Keep a wgmma in flight while each activation runs: "mosaic" -> fused_mlp(pipelined=True)
  # (needs mosaic_block_m=64), "mosaic_split" -> split_mlp(expand_pipelined=True).  Off in
  # every table entry: slower than the serial kernels at every ConvNeXt-T / ConvFirst shape
  # on an H100 (0.69-0.96x, 2026-11-26, `bash benchmarks/gpu_suite.sh pipelined`).
  mosaic_pipelined: bool = False
  # "mosaic_split", inference forward: W1^T slots per compute warpgroup of the
  # warp-specialised expand kernel (mosaic_split's ``_expand_kernel_ws``: 128-row CTAs, two
  # compute warpgroups on alternate hidden slices, so one's wgmmas run while the other's
  # activation and store do), from ``mosaic.EXPAND_WS_MIN_ROWS`` rows; 0 = the
  # single-warpgroup expand kernel (``mosaic_stages`` deep).  Ignored by "mosaic" and by
  # differentiated calls.  On in the H100 table at C=384 (1 slot: ConvNeXt-T inference at
  # batch 256 4% faster, 2026-11-27; the training step tied, 7,049 vs 7,098 img/s, so the
  # training forward keeps the other kernel); off in the heuristic (timed on an H100 only).
  mosaic_expand_ws: int = 0
  # "mosaic_split", inference forward: the expand as mosaic_gemm.py's K-streaming GEMM
  # (128 x 192 output tiles, two compute warpgroups + a TMA warpgroup, the LayerNorm in its
  # epilogue from XLA's row statistics); overrides mosaic_expand_ws.  On in the H100 table
  # at C=768 (expand 0.105 vs 0.141 ms at 7x7x768, batch 128; 0.182 vs 0.274 at 256; H100
  # 2026-11-28); slower at C=384 with LayerNorm (0.140 vs 0.120), so off there.  With
  # persistent CTAs (eleventh session): 7x7x768 0.087 / 0.157 ms; the 14x14x384 block
  # forward with it and the GEMM project 0.233 / 0.423 vs 0.236 / 0.401 without (batch
  # 128 / 256): still off at C=384.
  mosaic_expand_gemm: bool = False
  # "mosaic_split", inference forward: the project as mosaic_gemm.py's GEMM (128 rows x
  # mosaic_block_n per CTA, two compute warpgroups, mosaic_project_stages slots).  With one
  # CTA per tile the block forwards tied (14x14x384 0.236 / 0.394 ms vs 0.233 / 0.398 at
  # batch 128 / 256; 7x7x768 0.186 / 0.304 vs 0.183 / 0.310; H100 2026-11-28); with
  # persistent CTAs (eleventh session, same day) 14x14x384 0.236 / 0.401 vs 0.238 / 0.418,
  # so on in the H100 table's C=384 entry, but 7x7x768 0.177 / 0.304 vs 0.166 / 0.295 (off).
  mosaic_project_gemm: bool = False
  # The depthwise conv before the Mosaic kernels, and in "hybrid" differentiated calls its
  # forward and input gradient (dwconv.depthwise_conv(conv=...)): "pallas" = dwconv_triton.py
  # (default tiles; 1.4-2.0x XLA's conv on an H100, 2026-11-26), "xla" = XLA's conv.
  mosaic_dwconv: str = "pallas"
  # The depthwise conv's kernel gradient in differentiated calls (dwconv.WGRAD_METHODS):
  # "auto" (XLA's, or the grouped form at images no larger than the kernel), "pallas"
  # (dwconv_triton.depthwise_conv_wgrad) or "pallas_columns" (its column-walk kernel); the
  # Pallas forms need mosaic_dwconv="pallas", else "auto" runs.
  mosaic_dwconv_wgrad: str = "auto"
  # Differentiated calls ("hybrid" or "pallas") with a Mosaic forward: True = that forward
  # plus the Mosaic backward of pallas_kernels/mosaic_mlp_bwd.py for the pointwise half
  # ("mosaic": one kernel for dz, h, da; "mosaic_split": one for h, da, with dzn and the LN
  # backward in XLA) and XLA's weight-gradient GEMMs; the depthwise conv as
  # ``mosaic_dwconv`` says, its weight gradient XLA's.  False = XLA's forward + backward
  # ("hybrid") or the Triton backward ("pallas").  ``mosaic_bwd_stages``: the backward
  # kernel's weight pipeline depth; ``mosaic_bwd_hidden``: its hidden chunk (0: the
  # forward's ``mosaic_hidden`` for the one-kernel form, 32 for the split form).
  mosaic_backward: bool = False
  mosaic_bwd_stages: int = 2
  mosaic_bwd_hidden: int = 0
  # The Mosaic backward's db1 (fc1 bias gradient) from per-CTA column sums of da written by
  # the backward kernel instead of XLA's pass over da (0.09 ms of the 2.34 ms stage-1 block,
  # H100 2026-11-26); 64-row backward CTAs only (mosaic_bwd_block_m).  Was on in the H100
  # table at C=96 only (off since that entry has 128-row CTAs): training-path blocks, N=128, two
  # H100 runs 2026-11-26: 56x56x96 2.320 / 2.000 ms vs 2.369 / 2.045 without, but 28x28x192
  # 1.334 / 1.302 vs 1.311 / 1.264, 14x14x384 0.996 / 0.970 vs 0.987 / 0.965; on an H200
  # 56x56x96 1.945 vs 1.925 (off in the heuristic).
  mosaic_bwd_db1: bool = False
  # The Mosaic backward kernels also store the normalised z tile they compute (one TMA
  # store), which XLA's dW1 GEMM then reads instead of recomputing LN(z + zb) in two passes
  # over z: N=128 training-path blocks, H100 2026-11-26, 56x56x96 2.045 vs 2.333 ms,
  # 28x28x192 1.264 vs 1.341, 14x14x384 0.965 vs 0.987 (H200: 1.925 / 1.177 / 0.924 vs
  # 2.041 / 1.241 / 0.935).
  mosaic_bwd_zn: bool = True
  # The one-kernel Mosaic backward's rows per CTA: 64 (one warpgroup) or 128 (two compute
  # warpgroups sharing each weight slice, fed by a TMA warpgroup: mosaic_mlp_bwd's
  # ``_bwd_kernel_ws``).  The split form (C > 256) has 64 only.
  mosaic_bwd_block_m: int = 64
  # The split backward (C > 256) with two compute warpgroups on alternate hidden chunks of
  # the same 64 rows (mosaic_mlp_bwd's ``_hidden_grad_kernel_ws``; mosaic_bwd_stages is then
  # per warpgroup, 1 at C=384).  On in the H100 table at C=384 (see TUNED); off in the
  # heuristic (timed on an H100 only).
  mosaic_bwd_split_ws: bool = False
  # db1 (fc1's bias gradient) as one more row of XLA's dW1 GEMM: the Mosaic backward kernels
  # write ones after zn's C columns (mosaic_mlp_bwd's ``zn_ones``), so [zn | 1]^T da holds
  # sum(da) and no pass reads the 4C-wide da again (0.058 ms of the 28x28x192 block's 1.04 ms
  # of kernels, H100 2026-11-27 profile).  Needs mosaic_bwd_zn; ignored with mosaic_bwd_db1.
  # On in the H100 table (C=96 / 192 / 384: 2.6-5.7% faster blocks, see TUNED); off in the
  # heuristic (not timed on other GPUs; retune tries it).
  mosaic_bwd_db1_gemm: bool = False
  # db2 (fc2's bias gradient) likewise from the dW2 GEMM: the kernels write each row's scale
  # (drop path; 1 without) after h's E columns (mosaic_mlp_bwd's ``h_scales``), so
  # [h | s]^T g holds sum_r s_r g_r and no pass reads dy for it.  On in the H100 table at
  # C=192 / 384 (see TUNED; at C=96 it measured 1% slower); off in the heuristic.
  mosaic_bwd_db2_gemm: bool = False
  # What implementation=None runs (from measurements, per channel count and device):
  # "pallas": Pallas forward and backward; "hybrid": Pallas for plain (inference) calls,
  # XLA forward+backward when the call is differentiated (the Pallas forward was faster
  # but the Pallas backward slower); "xla": the XLA reference.
  auto: str = "pallas"

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def heuristic_tiles(c: int, dtype) -> ConvNeXtTiles:
  """Defaults by channel count (register budget: see module docstring).  ``auto`` follows
  the measurements for GPUs not in the table: Pallas forward for plain calls ("hybrid") up
  to C=512 (the Mosaic forward up to 256, the split Mosaic forward above: 1.2-1.3x XLA at
  C=384 on an H200, 2026-11-26); from 513 to 768 channels in bfloat16 the split Mosaic
  forward and, when differentiated, XLA's block with the Pallas depthwise conv and its
  kernel gradient (the H100 table's C=768 entry: on an H200, 2026-11-26, 7x7x768, batch 128,
  forward 0.271 ms vs XLA 0.289, forward + backward 0.714 vs 0.868 -- the old heuristic, XLA's
  block with the grouped kernel gradient, 0.847), its inference expand as mosaic_gemm.py's
  GEMM (timed on an H100 only, 2026-11-28: 0.105 vs 0.141 ms at 7x7x768; the kernel's
  advantage -- wider wgmmas, both operands streamed -- is not specific to that part); XLA above (the split form's tiles do not
  fit shared memory there, and the Triton forward is slower than XLA's) and for other
  dtypes above 512.  Differentiated calls: the Mosaic forward + backward up to C=256
  (``mosaic_backward``: 1.55-1.6x XLA's block on an H100), XLA's block above (the split
  backward tied with it at C=384; the Triton backward is slower than XLA's at every C;
  benchmarks/RESULTS.md)."""
  if 512 < c <= 768 and jnp.dtype(dtype) == jnp.bfloat16:
    return ConvNeXtTiles(fwd_pixels=32, fwd_hidden=32, fwd_warps=8, fwd_stages=2,
                         bwd_pixels=32, bwd_hidden=32, bwd_warps=8, wgrad_rows=64,
                         wgrad_hidden=16, wgrad_warps=8, fwd_kernel="mosaic_split",
                         mosaic_stages=2, mosaic_dwconv_wgrad="pallas_columns", auto="hybrid",
                         mosaic_expand_gemm=True, **_project_tile(c))
  return dataclasses.replace(_heuristic_tiles(c), auto="hybrid" if c <= 512 else "xla")


def _project_tile(c: int) -> dict:
  """The split form's project CTA: 128 rows x 192 channels where 192 divides C (H100
  2026-11-26, C=384: 0.198-0.212 ms per kernel pair vs 0.241 for 64 x 192), else 64 rows and
  the default width -- 128 rows measured slower with 128 channels (0.237 vs 0.217-0.227)
  and spill registers with 256 (a 128 x 256 float32 accumulator: 0.57-0.59 ms at C=768)."""
  if c % 192 == 0:
    return dict(mosaic_project_block_m=128, mosaic_block_n=192)
  return dict(mosaic_project_block_m=64, mosaic_block_n=0)


def _heuristic_tiles(c: int) -> ConvNeXtTiles:
  if c <= 128:  # Mosaic, normalising in place: 2 stages = 3 CTAs per SM at C=96 (H100
    # 2026-11-26: 0.296 ms vs 0.303 with 3 stages); Mosaic backward with 1 weight stage
    # (see TUNED)
    return ConvNeXtTiles(fwd_pixels=128, fwd_hidden=64, bwd_pixels=64, bwd_hidden=64,
                         wgrad_rows=128, wgrad_hidden=64, mosaic_stages=2,
                         mosaic_backward=True, mosaic_bwd_stages=1)
  if c <= 256:  # Mosaic: H200 2026-11-25, C=192: bm128 s2 0.397 ms vs bm64 s3 0.457 ms;
    # 128-row CTAs with 2 weight stages where they fit shared memory -- not at C=256
    # (~269 KB: the compiler refused it on an H200, 2026-11-27), which keeps 64-row CTAs
    # with 2 stages: H100 2026-11-27, batch 128, block forward 14x14x256 0.134 ms vs 0.149
    # with 128-row CTAs and 1 stage, 0.154 with 64 rows and 1 stage (XLA 0.295); 28x28x256
    # 0.459 vs 0.445 / 0.540 (XLA 0.992); 64 rows with 3 stages does not fit (the Triton
    # forward runs: 0.320 / 0.978).  Mosaic backward with 2 weight stages where they fit
    # (see TUNED)
    from pallas_kernels import mosaic_mlp, mosaic_mlp_bwd
    fits = mosaic_mlp_bwd.bwd_smem_bytes(c, 64, 2) <= mosaic_mlp_bwd.SMEM_BYTES
    wide = mosaic_mlp.unsupported_reason(1, c, 4 * c, jnp.bfloat16, 64, block_m=128,
                                         stages=2) is None
    return ConvNeXtTiles(fwd_pixels=64, fwd_hidden=64, bwd_pixels=64, bwd_hidden=32,
                         wgrad_rows=64, wgrad_hidden=32, mosaic_block_m=128 if wide else 64,
                         mosaic_stages=2, mosaic_backward=True,
                         mosaic_bwd_stages=2 if fits else 1)
  if c <= 512:  # split Mosaic: H200 2026-11-26, C=384: expand 2 stages 0.132 ms vs 0.165
    return ConvNeXtTiles(fwd_pixels=32, fwd_hidden=64, fwd_warps=4, bwd_pixels=32,
                         bwd_hidden=32, wgrad_rows=64, wgrad_hidden=32,
                         fwd_kernel="mosaic_split", mosaic_stages=2,
                         **_project_tile(c))
  return ConvNeXtTiles(fwd_pixels=16, fwd_hidden=32, fwd_warps=8, bwd_pixels=16,
                       bwd_hidden=32, bwd_warps=8, wgrad_rows=64, wgrad_hidden=16,
                       wgrad_warps=8)


# (C, dtype name, device kind) -> tiles measured on that device: ``retune`` winners from
# `python -m benchmarks.blocks --tune` (H100 80GB HBM3, batch 128, 2026-11-24), and the
# implementation=None choice from the same run (benchmarks/RESULTS.md): Pallas forward
# 1.20x / 1.17x faster than XLA at C=96 / 192 but its backward slower at every stage, and
# both slower at C=384 / 768.  The Mosaic forward's tiles (mosaic_*) were measured on an
# H200 (2026-11-25, benchmarks.mosaic_blocks): C=96 best with one warpgroup per CTA and 3
# weight stages (0.603-0.607 ms), C=192 with two compute warpgroups (0.397 ms).  C=384 now
# runs the split Mosaic forward under None ("hybrid"): H200 2026-11-26, see heuristic_tiles.
# H100 2026-11-26 (normalised tile in place, 128-row project CTAs): C=96 2 stages, C=384
# project 128 x 192 (the kernel pair 0.198 ms vs 0.241 with 64 x 192).  C=768 runs the split
# form under None since the cheaper GELU (mosaic_mlp._gelu): block forward at 7x7x768, batch
# 128, 0.264 / 0.274 ms with 128 x 192 project tiles vs XLA 0.302 / 0.316 in two rounds of
# one run (64 x 256: 0.287 / 0.303; it had been within noise of XLA before).
# Differentiated calls at C=96 / 192 run the Mosaic forward + backward (mosaic_backward):
# block forward + backward, batch 128, bf16, H100 2026-11-26 (benchmarks.mosaic_train):
# 56x56x96 2.327 ms with 1 backward weight stage (2.410 with 2; 2 CTAs per SM fit with 1)
# vs XLA 3.731 and the previous "hybrid" 3.604; 28x28x192 1.305 ms with 2 (1.518 with 1) vs
# XLA 2.032 and "hybrid" 1.921.  C=384 (split backward, 2 stages): 0.975-0.995 ms vs XLA
# 1.095 and "hybrid" 0.970-0.991 (a tie; the whole training step measured 5,194 vs 5,097
# img/s with it on vs off in one run, so it stays on).  C=768 keeps XLA's block when
# differentiated (no split backward: its tiles do not fit shared memory) but with the
# Pallas depthwise-conv kernel gradient (mosaic_dwconv_wgrad): 0.723 ms vs "hybrid" 0.892 and
# XLA 0.870 (the kernel gradient alone 0.100 ms vs the grouped form's 0.231 and XLA's own
# 2.126); at 14x14 and larger XLA's kernel gradient is faster than the Pallas one (0.094 vs
# 0.128, 0.122 vs 0.336, 0.218 vs 0.641 ms).  The column-walk kernel gradient
# ("pallas_columns", H100 2026-11-27, benchmarks.dwconv_wgrad, batch 128) beats XLA's at
# C=192 / 384 / 768 (0.120 / 0.068 / 0.059 ms vs 0.132 / 0.099 / 2.136) and ties it at C=96
# (0.226 vs 0.229, which keeps "auto"): those three entries use it.  The two-warpgroup
# Mosaic backward (mosaic_bwd_block_m=128, H100 2026-11-27, batch 128, block forward +
# backward in one process, two rounds): 56x56x96 1.775 / 1.800 ms with 2 weight stages (1
# stage: 1.983) vs 1.876 / 1.867 for the 64-row kernel with 1 stage and db1 column sums
# (which the 128-row kernel cannot have; without them 1.869); 28x28x192 1.070 / 1.085 vs
# 1.112 / 1.130.  ConvNeXt-T training step (batch 256, two processes each): 6,732 / 6,723
# img/s vs 6,611 / 6,620 with the 64-row kernels; XLA 4,196.  The split backward with two
# compute warpgroups on alternate hidden chunks (mosaic_bwd_split_ws, 1 weight stage each;
# H100 2026-11-27, seventh session): 14x14x384 block forward + backward 0.842 ms vs 0.864
# with the one-warpgroup split kernel (2 stages), XLA 1.096 in the same process; ConvNeXt-T
# training step 6,784 vs 6,745 img/s (one process each), XLA 4,189.  db1 from the dW1 GEMM
# (mosaic_bwd_db1_gemm; same process, XLA / table before / with it): 56x56x96 3.749 / 1.798
# / 1.696 ms, 28x28x192 2.052 / 1.087 / 1.027, 14x14x384 1.099 / 0.837 / 0.822.  db2 from
# the dW2 GEMM as well (mosaic_bwd_db2_gemm; another process, XLA / db1 only / both):
# 56x56x96 3.751 / 1.703 / 1.721 (off at C=96), 28x28x192 2.052 / 1.042 / 1.022, 14x14x384
# 1.107 / 0.838 / 0.817; ConvNeXt-T training step 7,061 vs 7,013 img/s without it at
# C=192 / 384.
_H100 = "NVIDIA H100 80GB HBM3"
TUNED: dict[tuple[int, str, str], ConvNeXtTiles] = {
    (96, "bfloat16", _H100): ConvNeXtTiles(
        fwd_pixels=128, fwd_hidden=64, fwd_warps=4, bwd_pixels=64, bwd_hidden=64,
        wgrad_rows=128, wgrad_hidden=64, dw_pixels=128, dw_channels=32, auto="hybrid",
        mosaic_stages=2, mosaic_backward=True, mosaic_bwd_stages=2, mosaic_bwd_block_m=128,
        mosaic_bwd_db1_gemm=True),
    (192, "bfloat16", _H100): ConvNeXtTiles(
        fwd_pixels=64, fwd_hidden=64, fwd_warps=4, bwd_pixels=64, bwd_hidden=32,
        wgrad_rows=64, wgrad_hidden=32, dw_pixels=128, dw_channels=32, auto="hybrid",
        mosaic_block_m=128, mosaic_stages=2, mosaic_backward=True, mosaic_bwd_stages=2,
        mosaic_bwd_block_m=128, mosaic_dwconv_wgrad="pallas_columns", mosaic_bwd_db1_gemm=True,
        mosaic_bwd_db2_gemm=True),
    (384, "bfloat16", _H100): ConvNeXtTiles(
        fwd_pixels=32, fwd_hidden=64, fwd_warps=4, bwd_pixels=32, bwd_hidden=32,
        wgrad_rows=64, wgrad_hidden=32, dw_pixels=128, dw_channels=32, auto="hybrid",
        fwd_kernel="mosaic_split", mosaic_stages=2, mosaic_project_block_m=128,
        mosaic_block_n=192, mosaic_backward=True, mosaic_bwd_stages=1,
        mosaic_bwd_split_ws=True, mosaic_dwconv_wgrad="pallas_columns",
        mosaic_bwd_db1_gemm=True, mosaic_bwd_db2_gemm=True, mosaic_expand_ws=1,
        mosaic_project_gemm=True),
    (768, "bfloat16", _H100): ConvNeXtTiles(
        fwd_pixels=32, fwd_hidden=32, fwd_warps=8, fwd_stages=2, bwd_pixels=32,
        bwd_hidden=32, bwd_warps=8, wgrad_rows=64, wgrad_hidden=16, wgrad_warps=8,
        dw_pixels=128, dw_channels=32, auto="hybrid", fwd_kernel="mosaic_split",
        mosaic_stages=2, mosaic_project_block_m=128, mosaic_block_n=192,
        mosaic_dwconv_wgrad="pallas_columns", mosaic_expand_gemm=True),
}

# Devices that use another device's table entries (the key's device kind), where that was
# measured to beat the heuristic.  The H200 is the H100 SXM's sm_90 chip (132 SMs, 228 KB
# of shared memory per SM) with more and faster HBM; on one (2026-11-28, batch 128, bf16,
# one process per tile source, ``benchmarks.blocks``) the H100 entries ran the block
# forward + backward at 56x56x96 / 28x28x192 / 14x14x384 in 1.563 / 0.964 / 0.795 ms vs
# 1.690 / 1.061 / 0.889 with the heuristic (XLA 3.25 / 1.81 / 1.01), the forwards and the
# C=768 entry within 3%, and ConvNeXt-T's training step (batch 256) at 7,415 vs 6,850 img/s
# (XLA 3,414).  Other Hopper parts (H100 PCIe / NVL: fewer SMs; GH200) are not aliased --
# not measured; ``retune`` or the heuristic serves them.
TABLE_ALIASES: dict[str, str] = {"NVIDIA H200": _H100}

_CACHE_ENV = "CONVFIRST_JAX_TUNING_CACHE"


def _cache_path() -> str:
  return os.environ.get(_CACHE_ENV, os.path.expanduser("~/.cache/convfirst_jax/convnext_block.json"))


def _device_kind() -> str:
  try:
    return jax.devices()[0].device_kind
  except Exception:  # pragma: no cover
    return "unknown"


def _load_cache() -> dict:
  try:
    with open(_cache_path()) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _key(c: int, dtype, kind: str) -> str:
  return f"{c}|{jnp.dtype(dtype).name}|{kind}"


def get_tiles(c: int, dtype, device_kind: str | None = None) -> ConvNeXtTiles:
  kind = device_kind or _device_kind()
  name = jnp.dtype(dtype).name
  cached = _load_cache().get(_key(c, dtype, kind))
  if cached:
    fields = {f.name for f in dataclasses.fields(ConvNeXtTiles)}
    return ConvNeXtTiles(**{k: v for k, v in cached.items() if k in fields})
  table_kind = TABLE_ALIASES.get(kind, kind)
  if (c, name, table_kind) in TUNED:
    return TUNED[(c, name, table_kind)]
  return heuristic_tiles(c, dtype)


def _time(fn: Callable, args, iters: int = 20) -> float:
  # 10 back-to-back calls per sample: single synchronised calls of these sub-millisecond
  # kernels measured up to 1.7x slower and ranked candidates differently (H200, 2026-11-26).
  return median_seconds(fn, *args, warmup=3, iters=iters, reps=10)


def _time_tiles(make_fn: Callable, tiles: ConvNeXtTiles, args, iters: int) -> float:
  """Seconds per call of ``make_fn(tiles)`` (jitted) on ``args``: how ``retune`` scores one
  candidate."""
  return _time(jax.jit(make_fn(tiles)), args, iters)


def default_candidates(c: int, dtype) -> tuple[list[dict], list[dict]]:
  """(forward, backward) candidate changes to the heuristic tiles, per channel count."""
  if c <= 128:
    fwd = [dict(fwd_pixels=p, fwd_tile_w=tw, fwd_warps=nw) for p, tw, nw in
           ((64, 0, 4), (128, 16, 4), (64, 16, 4), (256, 16, 8))]
  elif c <= 256:
    fwd = [dict(fwd_pixels=p, fwd_tile_w=tw, fwd_warps=nw) for p, tw, nw in
           ((64, 0, 4), (64, 8, 4), (128, 16, 8), (32, 0, 4))]
  elif c <= 512:
    fwd = [dict(fwd_pixels=p, fwd_tile_w=tw, fwd_warps=nw) for p, tw, nw in
           ((32, 0, 4), (16, 0, 4), (32, 8, 4), (32, 0, 8))]
  else:
    fwd = [dict(fwd_pixels=p, fwd_warps=nw, fwd_stages=2) for p, nw in
           ((16, 8), (32, 8), (64, 8), (128, 8))]
  bwd = [dict(bwd_pixels=p, bwd_hidden=hc, dw_pixels=dp, dw_channels=dc) for p, hc, dp, dc in
         ((32, 32, 128, 32), (64, 32, 64, 16), (16, 32, 64, 32))]
  return fwd, bwd


MOSAIC_CANDIDATES = [dict(fwd_kernel="mosaic", mosaic_block_m=bm, mosaic_stages=st,
                          mosaic_hidden=hc, mosaic_dwconv=dw)
                     for bm, st, hc, dw in ((64, 2, 64, "pallas"), (64, 3, 64, "pallas"),
                                            (128, 2, 64, "pallas"), (128, 3, 64, "pallas"),
                                            (128, 2, 128, "pallas"), (64, 3, 64, "xla"),
                                            (128, 2, 64, "xla"))]
MOSAIC_SPLIT_CANDIDATES = [dict(fwd_kernel="mosaic_split", mosaic_stages=st,
                                mosaic_project_stages=pst, mosaic_project_block_m=pbm,
                                mosaic_block_n=bn, mosaic_dwconv=dw)
                           for st, pst, pbm, bn, dw in (
                               (2, 3, 64, 0, "pallas"), (2, 3, 64, 128, "pallas"),
                               (2, 3, 128, 0, "pallas"), (2, 3, 128, 128, "pallas"),
                               (2, 3, 128, 192, "pallas"), (2, 2, 128, 0, "pallas"),
                               (2, 4, 128, 128, "pallas"), (3, 3, 64, 0, "pallas"),
                               (2, 3, 128, 0, "xla"))] + [
    dict(fwd_kernel="mosaic_split", mosaic_stages=2, mosaic_project_stages=3,
         mosaic_project_block_m=128, mosaic_block_n=192, mosaic_dwconv="pallas",
         mosaic_expand_ws=1),
    dict(fwd_kernel="mosaic_split", mosaic_stages=2, mosaic_project_stages=3,
         mosaic_project_block_m=128, mosaic_block_n=192, mosaic_dwconv="pallas",
         mosaic_expand_gemm=True),
    dict(fwd_kernel="mosaic_split", mosaic_stages=2, mosaic_project_stages=4,
         mosaic_block_n=192, mosaic_dwconv="pallas", mosaic_expand_gemm=True,
         mosaic_project_gemm=True)]


def retune(x_shape, dtype=jnp.bfloat16, candidates: tuple[list[dict], list[dict]] | None = None,
           *, save: bool = True, iters: int = 10, verbose: bool = True):
  """Times candidate tile sets on random data of ``x_shape`` (NHWC) on the current device
  and stores the fastest in the JSON cache ($CONVFIRST_JAX_TUNING_CACHE, default
  ~/.cache/convfirst_jax/convnext_block.json) that ``get_tiles`` reads.  Phases: the
  Triton forward fields, then -- where the Mosaic GPU forwards can run (bfloat16/float16,
  Hopper; C % 32 == 0 and C <= 256 for the fused kernel, C % 64 == 0 for the split one) --
  their tiles and the depthwise conv before them (``MOSAIC_CANDIDATES``,
  ``MOSAIC_SPLIT_CANDIDATES``), and ``fwd_kernel`` is set to whichever forward was fastest; then the backward fields (timing
  the backward kernels, an independent launch); then, where a Mosaic forward won
  (one-kernel or split) and ``auto`` is "hybrid", whether differentiated calls run
  XLA's block (``mosaic_dwconv_wgrad`` "auto" or "pallas") or the Mosaic backward
  (``mosaic_backward``, 1 or 2 weight stages; for the one-kernel form also 64- or 128-row
  backward CTAs, ``mosaic_bwd_block_m``).  ``candidates``: (forward changes,
  backward changes) as dicts of ConvNeXtTiles fields for the Triton kernels.  Candidates
  that fail to compile (registers, shared memory) are skipped; RuntimeError (nothing cached)
  when none ran, e.g. without a GPU.  Returns (best, timings)."""
  from pallas_kernels import mosaic_mlp
  from pallas_kernels.convnext_block import dwconv_triton, mosaic, pallas_triton

  c = x_shape[-1]
  fwd_c, bwd_c = candidates or default_candidates(c, dtype)
  kx, kp, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape, jnp.float32).astype(dtype)
  g = jax.random.normal(kg, x_shape, jnp.float32).astype(dtype)
  params = reference_params(kp, c)
  dps = jnp.ones((x_shape[0],), jnp.float32)
  best = heuristic_tiles(c, dtype)
  timings, errors = [], []

  def phase(changes, make_fn, args, best, include_current=True):
    scored = []
    for change in ([{}] if include_current else []) + list(changes):
      tiles = dataclasses.replace(best, **change)
      try:
        t = _time_tiles(make_fn, tiles, args, iters)
      except Exception as e:  # noqa: BLE001 - a candidate that does not compile
        errors.append(f"{type(e).__name__}: {str(e)[:200]}")
        if verbose:
          print(f"  skip {change}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        continue
      scored.append((t, tiles))
      timings.append((tiles.to_json(), t))
      if verbose:
        print(f"  {x_shape} {t * 1e3:8.3f} ms  {change or 'current'}", flush=True)
    return min(scored, key=lambda r: r[0]) if scored else (float("inf"), best)

  t_triton, best = phase(
      [dict(ch, fwd_kernel="triton") for ch in fwd_c],
      lambda t: lambda x, p, d: pallas_triton.forward(x, p, d, eps=1e-6, tiles=t,
                                                      interpret=False),
      (x, params, dps), dataclasses.replace(best, fwd_kernel="triton"))
  if mosaic_mlp.device_unsupported_reason(False) is None:
    changes = []
    if mosaic.unsupported_reason(x_shape, params, dtype) is None:
      changes += MOSAIC_CANDIDATES
    if mosaic.unsupported_reason(x_shape, params, dtype, split=True) is None:
      changes += MOSAIC_SPLIT_CANDIDATES
    if changes:
      t_mosaic, best_m = phase(
          changes,
          lambda t: lambda x, p, d: mosaic.forward(
              x, p, d, eps=1e-6, hidden_chunk=t.mosaic_hidden, stages=t.mosaic_stages,
              block_m=t.mosaic_block_m, split=t.fwd_kernel == "mosaic_split",
              project_stages=t.mosaic_project_stages,
              project_block_m=t.mosaic_project_block_m, block_n=t.mosaic_block_n or None,
              pipelined=t.mosaic_pipelined, expand_ws=t.mosaic_expand_ws,
              expand_gemm=t.mosaic_expand_gemm, project_gemm=t.mosaic_project_gemm,
              dwconv_tiles=(None if t.mosaic_dwconv == "xla"
                            else dwconv_triton.default_tiles(x.shape[2]))),
          (x, params, dps), best, include_current=False)
      if verbose:
        print(f"  forward: Triton {t_triton * 1e3:.3f} ms, Mosaic {t_mosaic * 1e3:.3f} ms "
              f"({best_m.fwd_kernel})", flush=True)
      if t_mosaic < t_triton:
        best = best_m
  _, best = phase(bwd_c, lambda t: lambda x, p, d, g: pallas_triton.backward(
      x, p, d, g, eps=1e-6, tiles=t, interpret=False), (x, params, dps, g), best)
  if best.fwd_kernel in ("mosaic", "mosaic_split") and best.auto == "hybrid":
    # Differentiated calls (gradients of x and the parameters, as in training): XLA's block
    # (with the depthwise conv as mosaic_dwconv says, and its kernel gradient XLA's or the
    # Pallas kernel's) or the Mosaic forward + backward (one-kernel or split form, as the
    # forward; a form the shape does not support times XLA's block again).
    from pallas_kernels.convnext_block import api

    def grad_call(t):
      def run(x, p, d, g):
        _, vjp = jax.vjp(lambda x, p: api.convnext_block(x, p, d, tiles=t), x, p)
        return vjp(g)
      return run

    wgrads = (("auto", "pallas", "pallas_columns") if best.mosaic_dwconv == "pallas"
              else ("auto",))
    # 128-row backward CTAs exist for the one-kernel form only
    bwd_rows = (64, 128) if best.fwd_kernel == "mosaic" else (64,)
    # the split form's two-warpgroup backward (one weight stage per warpgroup fits C=384)
    split_ws = ([dict(mosaic_backward=True, mosaic_bwd_stages=1, mosaic_bwd_split_ws=True)]
                if best.fwd_kernel == "mosaic_split" else [])
    _, best = phase([dict(mosaic_backward=False, mosaic_dwconv_wgrad=w) for w in wgrads]
                    + [dict(mosaic_backward=True, mosaic_bwd_stages=s, mosaic_bwd_block_m=bm)
                       for s in (1, 2) for bm in bwd_rows] + split_ws,
                    grad_call, (x, params, dps, g), best, include_current=False)
    if best.mosaic_backward and not best.mosaic_bwd_db1:  # db1 from the dW1 GEMM or not
      _, best = phase([dict(mosaic_bwd_db1_gemm=not best.mosaic_bwd_db1_gemm)], grad_call,
                      (x, params, dps, g), best)
    if best.mosaic_backward:  # db2 from the dW2 GEMM or not
      _, best = phase([dict(mosaic_bwd_db2_gemm=not best.mosaic_bwd_db2_gemm)], grad_call,
                      (x, params, dps, g), best)
  if not timings:  # nothing ran (e.g. no GPU): nothing to choose from, nothing to cache
    raise RuntimeError(f"retune: no candidate ran on {_device_kind()} "
                       f"(jax backend {jax.default_backend()!r}); first error: {errors[0]}")
  if save:
    data = _load_cache()
    data[_key(c, dtype, _device_kind())] = best.to_json()
    os.makedirs(os.path.dirname(os.path.abspath(_cache_path())), exist_ok=True)
    with open(_cache_path(), "w") as f:
      json.dump(data, f, indent=1, sort_keys=True)
  return best, timings


@functools.partial(jax.jit, static_argnames=("c", "hidden_ratio", "k"))
def reference_params(key, c: int, hidden_ratio: int = 4, k: int = 7):
  """Random block parameters (gamma O(1) so the branch is visible in comparisons).  Jitted:
  one program per (c, hidden_ratio, k) rather than an eager program per parameter shape
  (on XLA:CPU each costs ~0.1 s to compile, which the CPU tests paid at every width)."""
  from pallas_kernels.convnext_block.reference import ConvNeXtBlockParams
  ks = jax.random.split(key, 9)
  hdim = hidden_ratio * c
  n = jax.random.normal
  return ConvNeXtBlockParams(
      dw_kernel=n(ks[0], (k, k, c)) * 0.1, dw_bias=n(ks[1], (c,)) * 0.1,
      ln_scale=1.0 + 0.1 * n(ks[2], (c,)), ln_bias=0.1 * n(ks[3], (c,)),
      fc1_kernel=n(ks[4], (c, hdim)) / jnp.sqrt(c), fc1_bias=0.1 * n(ks[5], (hdim,)),
      fc2_kernel=n(ks[6], (hdim, c)) / jnp.sqrt(hdim), fc2_bias=0.1 * n(ks[7], (c,)),
      gamma=1.0 + 0.1 * n(ks[8], (c,)))
