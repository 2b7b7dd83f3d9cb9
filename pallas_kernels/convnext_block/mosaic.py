"""ConvNeXt block forward with the pointwise half in Mosaic GPU kernels.

    z = dwconv7x7(x)                       Pallas-Triton (dwconv_triton.py) or XLA, x.dtype
    y = x + dps * gamma * fc2(gelu(fc1(LN(z + dw_bias))))
                                           ``mosaic_mlp.fused_mlp`` (one kernel, C <= 256)
                                           or ``mosaic_split.split_mlp`` (two, C > 256)

The LN affine is folded into fc1 (W1' = diag(ln_scale) W1, b1' = b1 + ln_bias W1) and the
layer scale into fc2 (W2' = W2 diag(gamma), b2' = gamma * b2), in float32 before the cast
to x.dtype, so the kernel only normalises.  With one kernel the 4C-wide hidden activation
and the normalised input never reach DRAM (with two, the hidden activation makes one bf16
round trip); the depthwise conv's output z does (one write, one read: C wide, a quarter of
the hidden tensor XLA writes and reads).

``forward``: inference (``api.convnext_block`` differentiates it with the Triton backward
kernels or XLA, see tuning.py's ``auto``).  ``forward_train``: the same forward, made
differentiable by the Mosaic backward of mosaic_mlp_bwd.py for the pointwise half and the
depthwise conv's own VJP (dwconv.py), with autodiff through the weight folding."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import mosaic_mlp, mosaic_mlp_bwd, mosaic_split
from pallas_kernels.convnext_block import dwconv, dwconv_triton
from pallas_kernels.convnext_block.reference import ConvNeXtBlockParams


def unsupported_reason(x_shape, params: ConvNeXtBlockParams, dtype,
                       split: bool = False, *, block_m: int | None = None,
                       stages: int | None = None, hidden_chunk: int = 64) -> str | None:
  """Why ``forward`` cannot run this call, or None; with ``block_m`` and ``stages`` (the
  one-kernel form's) also whether they fit a CTA's shared memory."""
  n, h, w, c = x_shape
  if split:
    return mosaic_split.unsupported_reason(n * h * w, c, params.fc1_kernel.shape[1], dtype)
  return mosaic_mlp.unsupported_reason(n * h * w, c, params.fc1_kernel.shape[1], dtype,
                                       hidden_chunk, block_m=block_m, stages=stages)


def fold_params(params: ConvNeXtBlockParams):
  """(w1, b1, w2, b2) with the LN affine and the layer scale folded in, float32."""
  f32 = jnp.float32
  fc1 = params.fc1_kernel.astype(f32)
  w1 = params.ln_scale.astype(f32)[:, None] * fc1
  b1 = params.fc1_bias.astype(f32) + params.ln_bias.astype(f32) @ fc1
  gamma = params.gamma.astype(f32)
  w2 = params.fc2_kernel.astype(f32) * gamma[None, :]
  b2 = params.fc2_bias.astype(f32) * gamma
  return w1, b1, w2, b2


# The split form's warp-specialised expand kernel (tile field ``mosaic_expand_ws``) runs from
# this many rows per call: it has half as many CTAs as the 64-row kernel, and only the
# batch-256 measurement favoured it (H100, 2026-11-27, C=384: ConvNeXt-T inference 25,251 /
# 25,409 vs 24,351 img/s; the batch-128 block tied, 0.242 / 0.250 vs 0.254 / 0.244 ms; its
# LayerNorm expand alone at batch 128 0.135 vs 0.123 ms).  14x14 images: batch >= 168.
EXPAND_WS_MIN_ROWS = 32768


def forward(x: jax.Array, params: ConvNeXtBlockParams, dps: jax.Array | None = None, *,
            eps: float = 1e-6, hidden_chunk: int = 64, stages: int = 2,
            h_in_smem: bool | None = None, block_m: int = 64,
            dwconv_tiles: dwconv_triton.DwconvTiles | None = None, split: bool = False,
            project_stages: int = 3, project_block_m: int = 64, block_n: int | None = None,
            pipelined: bool = False, expand_ws: int = 0, expand_gemm: bool = False,
            project_gemm: bool = False, resident: bool | None = None,
            interpret: bool = False) -> jax.Array:
  """``dwconv_tiles``: None runs XLA's depthwise conv, else the Pallas-Triton one
  (dwconv_triton.py) with these tiles.  ``split``: the pointwise half as the two kernels of
  mosaic_split.py (any C multiple of 64; ``block_m`` and ``h_in_smem`` do not apply)
  instead of the one of mosaic_mlp.py (C <= 256); ``stages`` is then its expand kernel's
  pipeline depth, ``project_stages`` its project kernel's, ``project_block_m`` and
  ``block_n`` that kernel's rows and output channels per CTA.  ``pipelined``: the fused
  kernel's ``pipelined`` / the split form's ``expand_pipelined`` (a wgmma in flight while
  each activation runs).  ``expand_ws``: the split form's ``expand_ws_slots`` (its
  warp-specialised expand kernel; 0: off), applied from ``EXPAND_WS_MIN_ROWS`` rows
  (N H W) per call.  ``expand_gemm``: the split form's ``expand_gemm`` (its expand as
  the K-streaming GEMM of mosaic_gemm.py), ``project_gemm`` likewise for its project
  kernel.  ``resident``: the one-kernel form's ``fused_mlp(resident=)`` (None:
  its default, the resident-weight kernel wherever the weights fit)."""
  n, h, w, c = x.shape
  if dwconv_tiles is None:
    z = dwconv.depthwise_conv(x, params.dw_kernel, wgrad="xla")
  else:
    z = dwconv_triton.depthwise_conv(x, params.dw_kernel, tiles=dwconv_tiles,
                                     interpret=interpret is not False and interpret is not None)
  w1, b1, w2, b2 = fold_params(params)
  rows = n * h * w
  row_scale = None if dps is None else jnp.repeat(dps.astype(jnp.float32), h * w)
  if split:
    y = mosaic_split.split_mlp(
        z.reshape(rows, c), x.reshape(rows, c), w1, b1, w2, b2, z_bias=params.dw_bias,
        row_scale=row_scale, act="gelu", normalize=True, eps=eps, stages=stages,
        project_stages=project_stages, project_block_m=project_block_m, block_n=block_n,
        expand_pipelined=pipelined,
        expand_ws_slots=0 if expand_gemm or rows < EXPAND_WS_MIN_ROWS else expand_ws,
        expand_gemm=expand_gemm, project_gemm=project_gemm, interpret=interpret)
    return y.reshape(n, h, w, c)
  y = mosaic_mlp.fused_mlp(
      z.reshape(rows, c), x.reshape(rows, c), w1, b1, w2, b2, z_bias=params.dw_bias,
      row_scale=row_scale, act="gelu", normalize=True, eps=eps, hidden_chunk=hidden_chunk,
      stages=stages, h_in_smem=h_in_smem, block_m=block_m, pipelined=pipelined,
      resident=resident, interpret=interpret)
  return y.reshape(n, h, w, c)


# forward_train adds the depthwise conv's bias in the Pallas conv kernel, whose input-gradient
# pass then also sums the cotangent for the bias's gradient, from this many channels up;
# below it the bias goes to the Mosaic kernel and XLA sums dz.  The in-kernel sums re-read
# each program's pixels: at 56x56x96 (N=128, H100, 2026-11-26) that made the input-gradient
# kernel 0.266 -> 0.308 ms, more than the 0.032 ms pass it replaces.  Block forward +
# backward, same device, bias in the conv / in the Mosaic kernel: 56x56x96 2.009 / 1.982
# ms, 28x28x192 1.222 / 1.208, 14x14x384 (split form, where XLA's dz pass also goes) 0.904 /
# 0.948.
CONV_BIAS_MIN_C = 384


def _zn_ones(bwd_db1_gemm: bool, bwd_zn: bool, bwd_col_sums: bool) -> bool:
  """Whether db1 comes from the dW1 GEMM: asked for, with the kernel's zn stored and without
  the other way to db1 (the per-CTA column sums)."""
  return bwd_db1_gemm and bwd_zn and not bwd_col_sums


def train_unsupported_reason(x_shape, params: ConvNeXtBlockParams, dtype,
                             bwd_stages: int = 2, hidden_chunk: int = 64, split: bool = False,
                             bwd_hidden: int = 0, bwd_col_sums: bool = False, *,
                             fwd_block_m: int | None = None,
                             fwd_stages: int | None = None,
                             bwd_block_m: int = 64, bwd_split_ws: bool = False,
                             bwd_db1_gemm: bool = False, bwd_zn: bool = True,
                             bwd_db2_gemm: bool = False) -> str | None:
  """Why ``forward_train`` cannot run this call, or None (``bwd_hidden`` 0: the backward
  kernel's default chunk, ``hidden_chunk`` or 32 with ``split``; ``fwd_block_m`` /
  ``fwd_stages``: the one-kernel forward's, checked against shared memory;
  ``bwd_block_m`` applies to the one-kernel form, ``bwd_split_ws`` to the split form;
  ``bwd_db1_gemm`` / ``bwd_db2_gemm`` add the kernels' small tiles where ``forward_train``
  would use them)."""
  zn_ones = _zn_ones(bwd_db1_gemm, bwd_zn, bwd_col_sums)
  n, h, w, c = x_shape
  m, e = n * h * w, params.fc1_kernel.shape[1]
  if not split and fwd_block_m is not None:
    reason = mosaic_mlp.unsupported_reason(m, c, e, dtype, hidden_chunk,
                                           block_m=fwd_block_m, stages=fwd_stages)
    if reason:
      return reason
  if split:
    return (mosaic_split.unsupported_reason(m, c, e, dtype)
            or mosaic_mlp_bwd.split_unsupported_reason(m, c, e, dtype, "gelu",
                                                       bwd_hidden or 32, bwd_stages,
                                                       bwd_col_sums, bwd_split_ws, zn_ones,
                                                       bwd_db2_gemm))
  return mosaic_mlp_bwd.unsupported_reason(m, c, e, dtype, "gelu", bwd_hidden or hidden_chunk,
                                           bwd_stages, bwd_col_sums, bwd_block_m, zn_ones,
                                           bwd_db2_gemm)


def forward_train(x: jax.Array, params: ConvNeXtBlockParams, dps: jax.Array | None = None, *,
                  eps: float = 1e-6, hidden_chunk: int = 64, stages: int = 2,
                  block_m: int = 64, bwd_stages: int = 2, dwconv_pallas: bool = True,
                  split: bool = False, project_stages: int = 3, project_block_m: int = 64,
                  block_n: int | None = None, bwd_hidden: int = 0, dw_wgrad: str = "auto",
                  bwd_col_sums: bool = False, bwd_zn: bool = True, bwd_block_m: int = 64,
                  bwd_split_ws: bool = False, bwd_db1_gemm: bool = False,
                  bwd_db2_gemm: bool = False, interpret: bool = False) -> jax.Array:
  """The block forward of ``forward`` for differentiated calls (``split``: the two-kernel
  form and its backward, ``mosaic_mlp_bwd.hidden_grads``, for C > 256):

  * depthwise conv: ``dwconv.depthwise_conv`` -- forward and input gradient on the
    Pallas-Triton kernel (``dwconv_pallas``) or XLA, the weight gradient as ``dw_wgrad``
    says ("auto": XLA's; "pallas" / "pallas_columns": the Pallas-Triton kernels, with
    ``dwconv_pallas`` only);
    with ``dwconv_pallas`` the residual's share of x's gradient comes from the conv
    kernel's input-gradient pass (``dwconv.depthwise_conv_and_x``), and from
    ``CONV_BIAS_MIN_C`` channels up so do the conv bias (added in that kernel, rounded once
    with z) and its gradient;
  * LN + MLP + layer scale + residual: ``mosaic_mlp_bwd.mlp_with_grad`` (the inference
    kernel forward, the Mosaic backward kernel + XLA weight-gradient GEMMs);
  * the LN affine / layer-scale folding: plain jnp, so autodiff carries the folded
    weights' gradients back to ln_scale, ln_bias, fc1, fc2 and gamma.
  ``dps`` is differentiated only if it is perturbed (mlp_with_grad's row_scale).
  ``bwd_block_m`` (64 / 128 rows per backward CTA) applies to the one-kernel form,
  ``bwd_split_ws`` (the two-warpgroup split backward) to the split form; each is ignored by
  the other form.  ``bwd_db1_gemm``: db1 as a row of the dW1 GEMM (mlp_with_grad's), where
  ``bwd_zn`` is on and ``bwd_col_sums`` off (it is ignored otherwise: the same gradients
  either way); ``bwd_db2_gemm``: db2 as a row of the dW2 GEMM (mlp_with_grad's)."""
  n, h, w, c = x.shape
  interp = interpret is not False and interpret is not None
  if dwconv_pallas:  # x's gradient through the residual (and the conv bias's) come from
    conv_bias = c >= CONV_BIAS_MIN_C  # the conv kernel's input-gradient pass
    z, x = dwconv.depthwise_conv_and_x(x, params.dw_kernel,
                                       params.dw_bias if conv_bias else None,
                                       wgrad=dw_wgrad, interpret=interp)
    z_bias = None if conv_bias else params.dw_bias
  else:
    z = dwconv.depthwise_conv(x, params.dw_kernel, wgrad="auto", conv="xla", interpret=interp)
    z_bias = params.dw_bias
  w1, b1, w2, b2 = fold_params(params)
  rows = n * h * w
  row_scale = None if dps is None else jnp.repeat(dps.astype(jnp.float32), h * w)
  y = mosaic_mlp_bwd.mlp_with_grad(
      z.reshape(rows, c), x.reshape(rows, c), w1, b1, w2, b2, z_bias=z_bias,
      row_scale=row_scale, act="gelu", normalize=True, eps=eps, hidden_chunk=hidden_chunk,
      stages=stages, block_m=block_m, bwd_stages=bwd_stages, split=split,
      project_stages=project_stages, project_block_m=project_block_m, block_n=block_n,
      bwd_hidden=bwd_hidden, bwd_col_sums=bwd_col_sums, bwd_zn=bwd_zn,
      bwd_block_m=64 if split else bwd_block_m, bwd_split_ws=split and bwd_split_ws,
      bwd_db1_gemm=_zn_ones(bwd_db1_gemm, bwd_zn, bwd_col_sums), bwd_db2_gemm=bwd_db2_gemm,
      interpret=interpret)
  return y.reshape(n, h, w, c)
