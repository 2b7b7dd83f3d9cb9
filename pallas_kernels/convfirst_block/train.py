"""The ConvFirst block in *training* form (BatchNorm with batch statistics), with the two
BatchNorms in front of the 1x1 expansion's activation folded into the expansion's weights.

The training-form block (``convfirst_jax.ConvFirstBlock``):

    g = gconv(x)   a = BN_g(g) W1   h = silu(BN_1(a))   p = h W2   y = x + BN_2(p)

(BN with batch statistics: per channel, over all N*H*W rows; drop path scales BN_2(p) per
image.)  Run as written (XLA, ``flax`` modules), every BatchNorm is a reduction pass over its
input and a second pass applying it, and the E-wide tensors a and h cross DRAM several times
in the forward and more in the backward -- the reason XLA's training blocks run at 5-12% of
the fused floor (benchmarks/RESULTS.md).

The algebra used here: a BatchNorm whose input is a matrix product of something with known
first and second moments needs no pass over the product.  With u the rows feeding the
expansion (u = BN_g(g) = g s_g + t_g), mean m_u and
covariance S_u (C x C, from one Gram matrix u^T u: 2 M C^2 flops, a quarter of the
expansion's), a = u W1 has

    mean(a) = m_u W1     var(a)_j = W1[:, j]^T S_u W1[:, j]

so BN_1(a) = u W1' + b1' with W1' = W1 diag(s_1), b1' = beta_1 - mean(a) s_1, s_1 = gamma_1
/ sqrt(var(a) + eps) -- exactly BN_1 with batch statistics, computed from C x C statistics
instead of a pass over the E-wide a. BN_g folds into W1' as well (u's moments are g's,
scaled), so the whole pointwise half is

    p = silu(g W1'' + b1'') W2

-- the inference form's MLP, which ``mosaic_mlp_bwd.mlp_with_grad`` computes with the
Mosaic GPU forward kernel (h never in DRAM) and its Mosaic backward.  The folding is plain
jnp, so autodiff carries gradients back through W1'' and b1'' to W1, both BatchNorms'
affine parameters and, through the statistics (the Gram matrix), to g -- the same gradient
as BatchNorm's backward, with no E-wide reduction; the Gram matrix's own gradient is one
(M x C) x (C x C) product in the activations' dtype (``_mean_and_cov_bwd``: autodiff's
transpose made it a float32 GEMM writing a float32 M x C tensor).  BN_2 (C wide) is
``batchnorm.batch_norm_act``: its reductions Pallas kernels, its backward hand-written.
Statistics use the same one-pass variance as flax's BatchNorm (E[x^2] - E[x]^2 in float32,
clipped at 0), applied to the exact product instead of its rounded value.

Measured (H100, 2026-11-27, batch 128, bf16, forward + backward of x and every parameter;
benchmarks/RESULTS.md): this function 1.43 vs XLA's 1.99 ms at 56x56x64, 2.47-2.50 vs 3.12
at 56x56x96, 1.39 vs 1.61 at 28x28x192 ("fold" alone, XLA GEMMs: 1.70 / 2.68 / 1.42); the
model's block, once the kernel stopped reading a zero residual: 1.35 vs 2.14, 2.37 vs 3.33,
1.29 vs 1.74 ms (1.58x / 1.40x / 1.35x); with the Gram matrix's bf16 backward and BN_2 as
``batch_norm_act`` (same day, later): 1.289 vs 2.187 ms at 56x56x64 (1.70x), 1.167 vs 1.712
at 28x28x192 (1.47x), and every parameter gradient closer to a float32 run than bf16 XLA's
(BN_1's bias: 0.011 vs 0.338 norm-relative at 56x56x64).  The same fold of
BN_1 into the MBConv block's expansion (statistics from x's covariance, XLA GEMMs) measured
no faster than XLA's MBConv training block (1.49 vs 1.49 ms at 14x14x384, 1.08 vs 0.96 at
7x7x768): there the E-wide conv output's BatchNorm and the conv dominate, so it is not used.

Public entry points: ``convfirst_block_train`` (y and the batch statistics for the running
averages), ``ConvFirstTrainParams``, ``BatchStats``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _sharding, batchnorm
from pallas_kernels.convfirst_block.reference import GROUP_WIDTH, grouped_conv

IMPLEMENTATIONS = ("xla", "fold", "pallas")


class ConvFirstTrainParams(NamedTuple):
  """conv_kernel (k, k, 8, C); bn_conv (scale, bias) (C,); fc1_kernel (C, E); bn1 (E,);
  fc2_kernel (E, C); bn2 (C,).  The convs and matrix products have no bias (BatchNorm
  follows each)."""

  conv_kernel: jax.Array
  bn_conv_scale: jax.Array
  bn_conv_bias: jax.Array
  fc1_kernel: jax.Array
  bn1_scale: jax.Array
  bn1_bias: jax.Array
  fc2_kernel: jax.Array
  bn2_scale: jax.Array
  bn2_bias: jax.Array


class BatchStats(NamedTuple):
  """Batch mean and (biased) variance, float32, of the inputs of the block's three
  BatchNorms -- what ``flax.nnx.BatchNorm`` folds into its running averages."""

  conv: tuple[jax.Array, jax.Array]
  fc1: tuple[jax.Array, jax.Array]
  fc2: tuple[jax.Array, jax.Array]


# ------------------------------------------------------------------------------ checks


def check_train_args(x, params, name: str, conv_channels: int,
                     expected: dict[str, tuple[int, ...]]) -> None:
  """Clear errors for a training block's input (rank-4 float NHWC) and parameter shapes
  (``expected``: field -> shape; the conv kernel's k is read from params)."""
  if x.ndim != 4:
    raise ValueError(f"{name} expects NHWC input of rank 4, got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} expects floating-point input, got {x.dtype}")
  k = params.conv_kernel.shape[0]
  expected = {"conv_kernel": (k, k, GROUP_WIDTH, conv_channels), **expected}
  for field, shape in expected.items():
    actual = tuple(getattr(params, field).shape)
    if actual != shape:
      raise ValueError(f"{name}: params.{field} has shape {actual}, expected {shape} "
                       f"(x.shape={x.shape})")


def _check(x, params, name: str) -> tuple[int, int]:
  c = x.shape[-1]
  e = params.fc1_kernel.shape[-1]
  if c % GROUP_WIDTH or e % GROUP_WIDTH:
    raise ValueError(f"{name}: channels ({c}) and hidden width ({e}) must be multiples of "
                     f"the group width {GROUP_WIDTH}")
  check_train_args(x, params, name, c, {
      "bn_conv_scale": (c,), "bn_conv_bias": (c,), "fc1_kernel": (c, e), "bn1_scale": (e,),
      "bn1_bias": (e,), "fc2_kernel": (e, c), "bn2_scale": (c,), "bn2_bias": (c,)})
  return c, e


def _check_implementation(implementation):
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")


# ------------------------------------------------------------------------- statistics


def moments(z2d: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-column mean and variance of (M, C) rows, float32, as flax's BatchNorm computes them
  (E[z^2] - E[z]^2, clipped at 0)."""
  z = z2d.astype(jnp.float32)
  mean = z.mean(0)
  return mean, jnp.maximum(0.0, jnp.square(z).mean(0) - jnp.square(mean))


def _mean_and_cov_impl(z2d):
  m = z2d.shape[0]
  mean = z2d.astype(jnp.float32).sum(0) / m
  gram = lax.dot_general(z2d, z2d, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32) / m
  return mean, gram - jnp.outer(mean, mean)


@jax.custom_vjp
def _mean_and_cov(z2d):
  return _mean_and_cov_impl(z2d)


def _mean_and_cov_fwd(z2d):
  return _mean_and_cov_impl(z2d), (z2d, _mean_and_cov_impl(z2d)[0])


def _mean_and_cov_bwd(res, cts):
  # cov = Z^T Z / m - mean mean^T, mean = 1^T Z / m:
  #   dZ = Z (D + D^T) / m + 1 (dmean - (D + D^T) mean)^T / m      (D = dcov)
  # The (M x C) x (C x C) product runs in Z's dtype (autodiff's transpose of the float32
  # Gram matrix would promote Z to a float32 GEMM and write a float32 M x C tensor).
  z2d, mean = res
  dmean, dcov = cts
  m = z2d.shape[0]
  dsym = dcov + dcov.T
  dz = jnp.dot(z2d, (dsym / m).astype(z2d.dtype), preferred_element_type=jnp.float32)
  dz = dz + ((dmean - dsym @ mean) / m)[None, :]
  return (dz.astype(z2d.dtype),)


_mean_and_cov.defvjp(_mean_and_cov_fwd, _mean_and_cov_bwd)


def mean_and_cov(z2d: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-column mean (C,) and covariance (C, C) of (M, C) rows, float32: one Gram matrix
  z^T z (products of z's own dtype, accumulated in float32) and one column sum.  Its
  gradient to z is one (M x C) x (C x C) product in z's dtype (``_mean_and_cov_bwd``)."""
  return _mean_and_cov(z2d)


def _bn_coefficients(mean, var, scale, bias, eps):
  """(s, t) with BN(z) = z s + t for batch statistics (mean, var)."""
  s = scale.astype(jnp.float32) * lax.rsqrt(var + eps)
  return s, bias.astype(jnp.float32) - mean * s


def fold_batchnorm_dense(mean_u, cov_u, kernel, scale, bias, eps):
  """BN(u W) with batch statistics as u W' + b' (W' (C, E), b' (E,) float32), from the mean
  and covariance of u's rows; also returns the product's batch (mean, var)."""
  w = kernel.astype(jnp.float32)
  mean_a = mean_u @ w
  var_a = jnp.maximum(0.0, jnp.sum((cov_u @ w) * w, axis=0))
  s, t = _bn_coefficients(mean_a, var_a, scale, bias, eps)
  return w * s, t, (mean_a, var_a)


def _bn_apply(z, mean, var, scale, bias, eps):
  s, t = _bn_coefficients(mean, var, scale, bias, eps)
  return z.astype(jnp.float32) * s + t


def _residual(x, branch, drop_scale):
  if drop_scale is not None:
    branch = branch * drop_scale.astype(jnp.float32)[:, None, None, None]
  return (x.astype(jnp.float32) + branch).astype(x.dtype)


# -------------------------------------------------------------------------- pointwise


# Rows per CTA of the one-kernel Mosaic backward (C <= 256): 128, its two-warpgroup form
# (``mosaic_mlp_bwd._bwd_kernel_ws``), or 64 (one warpgroup); where 128 cannot run (shared
# memory) the 64-row kernel is used.  H100, bf16, batch 128, 2026-11-27 (seventh session,
# ``python -m benchmarks.blocks_convfirst_train --bwd-block-m``, XLA 2.203 / 3.354 / 1.738
# ms): ConvFirst training blocks 56x56x64 1.302 vs 1.306 ms, 56x56x96 2.137 vs 2.311,
# 28x28x192 1.161 vs 1.189; convfirst_t's training step (batch 256) 5,073 / 5,031 img/s vs
# 4,903 with 64.
BWD_BLOCK_M = 128
# db1 as one more row of the dW1 GEMM (mlp_with_grad's bwd_db1_gemm) where the backward
# kernel stores g for that GEMM (C < 192).  H100, bf16, batch 128, 2026-11-27 (seventh
# session): training blocks 56x56x64 1.256 vs 1.304 ms, 56x56x96 2.062 vs 2.147 (XLA 2.246 /
# 3.335); convfirst_t's training step (batch 256) 5,126 vs 5,092 img/s.
DB1_GEMM = True
# db2 as one more row of the dW2 GEMM (mlp_with_grad's bwd_db2_gemm: ones after h's E
# columns, these blocks having no row scale in the kernel).  Off: slower here (H100, batch
# 128, 2026-11-27, seventh session: 56x56x64 1.293 vs 1.261 ms, 56x56x96 2.089 vs 2.039,
# 28x28x192 1.178 vs 1.172), unlike ConvNeXt's blocks with their drop-path row scale.
DB2_GEMM = False


def _mosaic_mlp_config(m: int, c: int, e: int, dtype):
  """(kwargs for ``mlp_with_grad``, None) or (None, reason) for silu(g W1 + b1) W2."""
  from pallas_kernels import mosaic_mlp_bwd
  if c <= 256:
    reason = mosaic_mlp_bwd.unsupported_reason(m, c, e, dtype, "silu", 64, 2)
    if reason:
      return None, reason
    # From C=192 up: 128-row forward CTAs, and the backward kernel not storing a copy of g
    # for dW1 (XLA reads g itself): 1.336 vs 1.413 ms at 28x28x192, while at C=64 / 96 the
    # 64-row defaults measured best (1.422 / 2.495 ms; H100, batch 128, 2026-11-27).
    # Below C=192 the backward kernel stores its copy of g (bwd_zn), and with ones columns
    # after it db1 comes out of the dW1 GEMM (bwd_db1_gemm) instead of a pass over da.
    wide = dict(block_m=128, bwd_zn=False) if c >= 192 else dict(bwd_db1_gemm=DB1_GEMM)
    if BWD_BLOCK_M != 64 and mosaic_mlp_bwd.unsupported_reason(
        m, c, e, dtype, "silu", 64, 2, block_m=BWD_BLOCK_M) is None:
      wide["bwd_block_m"] = BWD_BLOCK_M
    return dict(hidden_chunk=64, stages=2, bwd_stages=2, bwd_db2_gemm=DB2_GEMM, **wide), None
  from pallas_kernels import mosaic_split
  reason = (mosaic_split.unsupported_reason(m, c, e, dtype)
            or mosaic_mlp_bwd.split_unsupported_reason(m, c, e, dtype, "silu", 32, 2))
  if reason:
    return None, reason
  return dict(split=True, stages=2, project_block_m=128 if c % 192 == 0 else 64,
              block_n=192 if c % 192 == 0 else None, bwd_stages=2), None


def _pallas_config(x_shape, e: int, dtype, interpret: bool):
  """(``mlp_with_grad`` settings, None) where the Mosaic pointwise kernels can run a ConvFirst
  training block of this shape (x_shape (N, H, W, C), hidden width E), else (None, reason)."""
  from pallas_kernels import mosaic_mlp
  reason = mosaic_mlp.device_unsupported_reason(interpret)
  if reason:
    return None, reason
  n, h, w, c = x_shape
  return _mosaic_mlp_config(n * h * w, c, e, dtype)



def _silu_mlp(z2d, w1, b1, w2, mosaic_cfg, interpret, batch):
  """silu(z W1 + b1) W2 over rows (``batch`` images' pixels): the Mosaic kernels with
  ``mosaic_cfg`` (the settings of ``_mosaic_mlp_config``), or XLA's two GEMMs where it is
  None."""
  dtype = z2d.dtype
  if mosaic_cfg is not None:
    from pallas_kernels import mosaic_mlp_bwd
    zeros_c = jnp.zeros((z2d.shape[1],), jnp.float32)
    return _sharding.map_batch(
        lambda z, w1, b1, w2, b2: mosaic_mlp_bwd.mlp_with_grad(
            z, None, w1, b1, w2, b2, act="silu", normalize=False, interpret=interpret,
            **mosaic_cfg),
        (z2d,), (w1, b1, w2, zeros_c), batch=batch)
  a = jnp.dot(z2d, w1.astype(dtype))
  return jnp.dot(jax.nn.silu(a.astype(jnp.float32) + b1).astype(dtype), w2.astype(dtype))


# ------------------------------------------------------------------------------ blocks


def _convfirst_xla(x, params, drop_scale, eps):
  """The block as written (what flax's modules compute), for implementation="xla"."""
  dtype = x.dtype
  n, h, w, c = x.shape
  g = grouped_conv(x, params.conv_kernel).reshape(-1, c)
  st_g = moments(g)
  u = _bn_apply(g, *st_g, params.bn_conv_scale, params.bn_conv_bias, eps).astype(dtype)
  a = jnp.dot(u, params.fc1_kernel.astype(dtype))
  st_a = moments(a)
  hid = jax.nn.silu(_bn_apply(a, *st_a, params.bn1_scale, params.bn1_bias, eps).astype(dtype))
  p = jnp.dot(hid, params.fc2_kernel.astype(dtype))
  st_p = moments(p)
  branch = _bn_apply(p, *st_p, params.bn2_scale, params.bn2_bias, eps).astype(dtype)
  y = _residual(x, branch.astype(jnp.float32).reshape(n, h, w, c), drop_scale)
  return y, BatchStats(st_g, st_a, st_p)


def convfirst_block_train(x: jax.Array, params: ConvFirstTrainParams,
                          drop_scale: jax.Array | None = None, *, eps: float = 1e-5,
                          implementation: str | None = None,
                          interpret: bool = False) -> tuple[jax.Array, BatchStats]:
  """ConvFirst training block: y = x + drop_scale * BN_2(silu(BN_1(BN_g(gconv(x)) W1)) W2),
  BatchNorms with batch statistics.  Returns (y, BatchStats); differentiable in x and every
  parameter.

  implementation: "xla" -- the block as written, every BatchNorm a pass over its input;
  "fold" -- BN_g and BN_1 folded into W1 from g's mean and covariance (module docstring),
  the pointwise GEMMs in XLA; "pallas" -- the fold with the pointwise half on the Mosaic GPU
  kernels (``mosaic_mlp_bwd.mlp_with_grad``: h never in DRAM), raising NotImplementedError
  naming the reason where they cannot run; None -- "pallas" where it runs, else "fold".
  The grouped conv is XLA's in every form (the Pallas-Triton grouped conv measured slower
  for training, benchmarks/RESULTS.md).  drop_scale: (N,) per-image scale or None."""
  _check_implementation(implementation)
  c, e = _check(x, params, "convfirst_block_train")
  if implementation == "xla":
    return _convfirst_xla(x, params, drop_scale, eps)
  mosaic_cfg = None  # "fold": XLA GEMMs
  if implementation in (None, "pallas"):
    interp = interpret is not False and interpret is not None
    mosaic_cfg, reason = _pallas_config(x.shape, e, x.dtype, interp)
    if reason and implementation == "pallas":
      raise NotImplementedError(f"convfirst_block_train(implementation='pallas'): {reason}")
  dtype = x.dtype
  n, h, w, _ = x.shape
  g = grouped_conv(x, params.conv_kernel).reshape(-1, c)
  mean_g, cov_g = mean_and_cov(g)
  var_g = jnp.maximum(0.0, jnp.diagonal(cov_g))
  s_g, t_g = _bn_coefficients(mean_g, var_g, params.bn_conv_scale, params.bn_conv_bias, eps)
  # u = g s_g + t_g has mean mean_g s_g + t_g and covariance diag(s_g) cov_g diag(s_g).
  w1, b1, st_a = fold_batchnorm_dense(mean_g * s_g + t_g, cov_g * jnp.outer(s_g, s_g),
                                      params.fc1_kernel, params.bn1_scale, params.bn1_bias,
                                      eps)
  # BN_1(u W1) = (g s_g + t_g) W1' + b1' = g (s_g W1') + (t_g W1' + b1')
  b1 = t_g @ w1 + b1
  w1 = s_g[:, None] * w1
  p = _silu_mlp(g, w1, b1, params.fc2_kernel, mosaic_cfg, interpret, n)
  # BN_2 with its reductions as Pallas kernels ("pallas"; None where they pick themselves)
  # or XLA's ("fold"), in both cases batchnorm's hand-written backward.
  branch, *st_p = batchnorm.batch_norm_act(
      p, params.bn2_scale, params.bn2_bias, eps=eps, batch=n, interpret=interpret,
      implementation={"fold": "xla"}.get(implementation, implementation))
  y = _residual(x, branch.astype(jnp.float32).reshape(n, h, w, c), drop_scale)
  return y, BatchStats((mean_g, var_g), st_a, tuple(st_p))
