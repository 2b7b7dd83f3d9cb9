"""Public entry point: ``convnext_block(x, params, drop_path_scale, implementation=...)``.

``implementation=None`` runs the fused Pallas kernels where they are supported (GPU
backend, or ``interpret=True`` anywhere) and falls back to the XLA reference otherwise;
where the tile table (tuning.py) holds measurements for the channel count and device, None
follows them: ``auto="xla"`` (XLA measured faster) or ``"hybrid"`` (Pallas forward for
plain calls, XLA forward+backward under differentiation);
``"pallas"`` raises ``NotImplementedError`` naming what is unsupported; ``"xla"`` always
runs the reference.  The Pallas forward is a Mosaic GPU form on a Hopper GPU (mosaic.py:
the Pallas-Triton depthwise conv of dwconv_triton.py, or XLA's, then LN + MLP + residual in
one kernel for bfloat16/float16 with C a multiple of 32 up to 256, or in two kernels --
mosaic_split.py -- for C a multiple of 64 above that), and the whole-block Pallas-Triton
kernel otherwise (``tiles.fwd_kernel`` chooses).  Gradients of the Pallas path come from a
``jax.custom_vjp`` whose forward saves only its inputs; the backward is the Pallas-Triton
kernels (see pallas_triton.py).  Under "hybrid" the differentiated block is XLA's except
its depthwise conv's forward and input gradient (``tiles.mosaic_dwconv``), or -- where
``tiles.mosaic_backward`` is set -- the Mosaic forward with the Mosaic backward of
mosaic_mlp_bwd.py (``train_kernel``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _sharding, mosaic_mlp
from pallas_kernels.convnext_block import dwconv_triton, mosaic, pallas_triton, tuning
from pallas_kernels.convnext_block.reference import (
    ConvNeXtBlockParams,
    convnext_block_reference,
    validate,
)

IMPLEMENTATIONS = ("xla", "pallas")

# implementation=None keeps XLA for inputs of fewer pixels (N*H*W) than this: ConvNeXt-T
# inference at batch 1 (3,136 and 784 pixels in the first two stages) ran at 423 img/s with
# the Mosaic forward vs 481 with XLA, while batch 16 (50,176 / 12,544) was 5,030 vs 4,187
# (H200, 2026-11-26; the per-call weight folding and row padding around the kernel cost more
# than the kernel saves on tiny inputs).  With this rule, same GPU, img/s XLA vs None: batch 1
# 492 vs 503, 2 800 vs 761 (stage 1 on the kernel), 4 1,027 vs 1,234, 8 2,524 vs 3,039.
MIN_ROWS_FOR_PALLAS = 4096


FWD_KERNELS = ("mosaic", "mosaic_split", "triton")


def forward_kernel(x_shape, dtype, params: ConvNeXtBlockParams, tiles: tuning.ConvNeXtTiles,
                   interpret: bool) -> str:
  """Which forward kernel the Pallas path runs: "mosaic" or "mosaic_split" where the tile
  table asks for it and that Mosaic GPU form supports the call, else "triton"."""
  if tiles.fwd_kernel not in FWD_KERNELS:
    raise ValueError(f"tiles.fwd_kernel must be one of {FWD_KERNELS}, got {tiles.fwd_kernel!r}")
  if tiles.fwd_kernel == "triton" or mosaic_mlp.device_unsupported_reason(interpret) is not None:
    return "triton"
  split = tiles.fwd_kernel == "mosaic_split"
  if mosaic.unsupported_reason(x_shape, params, dtype, split=split,
                               block_m=tiles.mosaic_block_m, stages=tiles.mosaic_stages,
                               hidden_chunk=tiles.mosaic_hidden) is None:
    return tiles.fwd_kernel
  return "triton"


def _forward(x, params, dps, eps, tiles, interpret):
  kernel = forward_kernel(x.shape, x.dtype, params, tiles, interpret)
  if kernel in ("mosaic", "mosaic_split"):
    dw_tiles = (dwconv_triton.default_tiles(x.shape[2], bool(interpret))
                if tiles.mosaic_dwconv == "pallas" else None)
    return mosaic.forward(x, params, dps, eps=eps, hidden_chunk=tiles.mosaic_hidden,
                          stages=tiles.mosaic_stages, block_m=tiles.mosaic_block_m,
                          split=kernel == "mosaic_split",
                          project_stages=tiles.mosaic_project_stages,
                          project_block_m=tiles.mosaic_project_block_m,
                          block_n=tiles.mosaic_block_n or None,
                          pipelined=tiles.mosaic_pipelined,
                          expand_ws=tiles.mosaic_expand_ws,
                          expand_gemm=tiles.mosaic_expand_gemm,
                          project_gemm=tiles.mosaic_project_gemm,
                          dwconv_tiles=dw_tiles, interpret=interpret)
  return pallas_triton.forward(x, params, dps, eps=eps, tiles=tiles, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused(x, params, dps, eps, tiles, interpret, xla_grad):
  return _forward(x, params, dps, eps, tiles, interpret)


def train_kernel(x_shape, dtype, params: ConvNeXtBlockParams, tiles: tuning.ConvNeXtTiles,
                 interpret: bool) -> str:
  """What a differentiated "hybrid" call runs: "mosaic" / "mosaic_split" (the Mosaic forward
  + backward of ``mosaic.forward_train``, one-kernel or split form) where
  ``tiles.mosaic_backward`` asks for it and that Mosaic form supports the call, else "xla"
  (XLA's block, the depthwise conv as ``tiles.mosaic_dwconv`` says)."""
  if not tiles.mosaic_backward:
    return "xla"
  kernel = forward_kernel(x_shape, dtype, params, tiles, interpret)
  if kernel in ("mosaic", "mosaic_split") and mosaic.train_unsupported_reason(
      x_shape, params, dtype, tiles.mosaic_bwd_stages, tiles.mosaic_hidden,
      split=kernel == "mosaic_split", bwd_hidden=tiles.mosaic_bwd_hidden,
      bwd_col_sums=tiles.mosaic_bwd_db1, fwd_block_m=tiles.mosaic_block_m,
      fwd_stages=tiles.mosaic_stages, bwd_block_m=tiles.mosaic_bwd_block_m,
      bwd_split_ws=tiles.mosaic_bwd_split_ws,
      bwd_db1_gemm=tiles.mosaic_bwd_db1_gemm, bwd_zn=tiles.mosaic_bwd_zn,
      bwd_db2_gemm=tiles.mosaic_bwd_db2_gemm) is None:
    return kernel
  return "xla"


def _value(p):
  return p.value if isinstance(p, jax.custom_derivatives.CustomVJPPrimal) else p


def _fused_fwd(x, params, dps, eps, tiles, interpret, xla_grad):
  # symbolic_zeros: the primals arrive wrapped, with whether each is perturbed; the drop-path
  # scale usually is not (it comes from an RNG), and then nothing is spent on its gradient.
  dps_perturbed = dps.perturbed
  x, dps = x.value, dps.value
  params = jax.tree.map(_value, params,
                        is_leaf=lambda p: isinstance(p, jax.custom_derivatives.CustomVJPPrimal))
  train = train_kernel(x.shape, x.dtype, params, tiles, interpret)
  mosaic_train = train != "xla"
  if xla_grad or mosaic_train:
    # "hybrid": a differentiated call runs XLA forward + backward (faster than the Triton
    # backward where the tile table says so), except the depthwise conv's forward and input
    # gradient, which take the Pallas-Triton conv where the tiles ask for it for the forward
    # (``mosaic_dwconv``); plain calls take the whole Pallas forward.  Where the tiles ask
    # for ``mosaic_backward`` (under "hybrid" or "pallas"), the Mosaic forward + backward
    # (mosaic.forward_train) instead.
    dw_pallas = tiles.mosaic_dwconv == "pallas"
    if mosaic_train:
      fn = lambda x, p, d: mosaic.forward_train(
          x, p, d, eps=eps, hidden_chunk=tiles.mosaic_hidden, stages=tiles.mosaic_stages,
          block_m=tiles.mosaic_block_m, bwd_stages=tiles.mosaic_bwd_stages,
          dwconv_pallas=dw_pallas, split=train == "mosaic_split",
          project_stages=tiles.mosaic_project_stages,
          project_block_m=tiles.mosaic_project_block_m,
          block_n=tiles.mosaic_block_n or None, bwd_hidden=tiles.mosaic_bwd_hidden,
          dw_wgrad=tiles.mosaic_dwconv_wgrad, bwd_col_sums=tiles.mosaic_bwd_db1,
          bwd_zn=tiles.mosaic_bwd_zn, bwd_block_m=tiles.mosaic_bwd_block_m,
          bwd_split_ws=tiles.mosaic_bwd_split_ws, bwd_db1_gemm=tiles.mosaic_bwd_db1_gemm,
          bwd_db2_gemm=tiles.mosaic_bwd_db2_gemm, interpret=interpret)
    else:
      fn = lambda x, p, d: convnext_block_reference(
          x, p, d, eps=eps, dw_conv="pallas" if dw_pallas else "xla",
          dw_wgrad=tiles.mosaic_dwconv_wgrad if dw_pallas else None, interpret=interpret)
    # Residuals: (vjp,) or (vjp of x and params, zero d dps); the Triton path's: 3 arrays.
    if dps_perturbed:
      y, vjp = jax.vjp(fn, x, params, dps)
      return y, (vjp,)
    y, vjp = jax.vjp(lambda x, p: fn(x, p, dps), x, params)
    return y, (vjp, jnp.zeros_like(dps))
  y = _forward(x, params, dps, eps, tiles, interpret)
  return y, (x, params, dps)


def _fused_bwd(eps, tiles, interpret, xla_grad, res, g):
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    g = jnp.zeros(g.shape, g.dtype)
  if len(res) == 1:  # jax.vjp of XLA's block or of mosaic.forward_train (see _fused_fwd)
    return res[0](g)
  if len(res) == 2:  # the same, dps not perturbed
    return (*res[0](g), res[1])
  x, params, dps = res
  dx, dparams, ddps = pallas_triton.backward(x, params, dps, g, eps=eps, tiles=tiles,
                                             interpret=interpret)
  return dx, dparams, ddps.astype(dps.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def pallas_unsupported_reason(x: jax.Array, params: ConvNeXtBlockParams,
                              interpret: bool) -> str | None:
  """Why the Pallas path cannot run this call, or None if it can."""
  if not interpret and jax.default_backend() != "gpu":
    return (f"the Pallas ConvNeXt block needs a GPU backend (got "
            f"{jax.default_backend()!r}); pass interpret=True to run it in the interpreter")
  k = params.dw_kernel.shape[0]
  if k % 2 == 0:
    return f"even depthwise kernel size {k}"
  if x.size >= 2**31 or (x.shape[0] * x.shape[1] * x.shape[2] + 2) * params.fc1_kernel.shape[1] >= 2**31:
    return f"input of shape {x.shape} is too large for int32 offsets"
  return None


def convnext_block(
    x: jax.Array,
    params: ConvNeXtBlockParams,
    drop_path_scale: jax.Array | None = None,
    *,
    eps: float = 1e-6,
    implementation: str | None = None,
    interpret: bool = False,
    tiles: tuning.ConvNeXtTiles | None = None,
) -> jax.Array:
  """ConvNeXt block y = x + dps[n] * gamma * fc2(gelu(fc1(LN(dwconv(x))))) on NHWC x.

  drop_path_scale: optional (N,) per-sample multiplier of the residual branch.
  tiles: override the tile table (tuning.get_tiles) for this call."""
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(
        f"implementation must be one of None, {IMPLEMENTATIONS}, got {implementation!r}")
  validate(x, params)
  if drop_path_scale is not None and tuple(jnp.shape(drop_path_scale)) != (x.shape[0],):
    raise ValueError(f"drop_path_scale must have shape ({x.shape[0]},), got "
                     f"{jnp.shape(drop_path_scale)}")
  if implementation == "xla":
    return convnext_block_reference(x, params, drop_path_scale, eps=eps)
  reason = pallas_unsupported_reason(x, params, interpret)
  if reason is not None:
    if implementation == "pallas":
      raise NotImplementedError(f"convnext_block(implementation='pallas'): {reason}")
    return convnext_block_reference(x, params, drop_path_scale, eps=eps)
  if tiles is None:
    tiles = tuning.get_tiles(x.shape[-1], x.dtype)
  auto = tiles.auto if implementation is None else "pallas"
  if auto not in ("pallas", "hybrid", "xla"):
    raise ValueError(f"tiles.auto must be 'pallas', 'hybrid' or 'xla', got {auto!r}")
  if tiles.mosaic_dwconv not in ("pallas", "xla"):
    raise ValueError(f"tiles.mosaic_dwconv must be 'pallas' or 'xla', got "
                     f"{tiles.mosaic_dwconv!r}")
  if auto == "xla":  # the tile table records that XLA measured faster here
    return convnext_block_reference(x, params, drop_path_scale, eps=eps)
  if implementation is None and (  # per device under a mesh: what each kernel call sees
      _sharding.local_batch(x.shape[0]) * x.shape[1] * x.shape[2] < MIN_ROWS_FOR_PALLAS):
    return convnext_block_reference(x, params, drop_path_scale, eps=eps)
  dps = (jnp.ones((x.shape[0],), jnp.float32) if drop_path_scale is None
         else jnp.asarray(drop_path_scale))
  eps, interpret, hybrid = float(eps), bool(interpret), auto == "hybrid"
  return _sharding.map_batch(
      lambda x, dps, params: _fused(x, params, dps, eps, tiles, interpret, hybrid),
      (x, dps), (params,), batch=x.shape[0])
