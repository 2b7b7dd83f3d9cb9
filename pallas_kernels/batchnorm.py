"""BatchNorm with batch statistics (+ optional SiLU) over (M, C) rows: the per-channel
reductions as Pallas-Triton kernels, the elementwise passes as XLA fusions.

Why: in ConvFirstNet's training step XLA lowers a BatchNorm's statistics (and the two
per-channel sums of its backward) to column reductions over all N*H*W rows that run far
below DRAM bandwidth -- in the MBConv training block at 14x14x256 (batch 128, H100,
2026-11-27, ``benchmarks.kernel_profile``-style trace) a one-input reduction over the
(25,088 x 1,024) bfloat16 conv output took 74 us (0.7 TB/s) and the backward's two-input
sums 95 us, where reading those bytes takes ~17 / 34 us.  The elementwise passes (apply,
input gradient) run near bandwidth in XLA and stay there.

Kernels (each program owns a ``block_cols``-wide column block and a contiguous range of
rows, walks it in (``block_rows`` x ``block_cols``) tiles accumulating float32 in
registers, and writes one row of partial sums; a small XLA sum over the programs finishes
the reduction):

* ``column_sums``: sum(z) and sum(z^2) per column -- the forward statistics (mean and
  flax's one-pass variance E[z^2] - E[z]^2, clipped at 0);
* ``_bwd_sums``: sum(dv) and sum(dv * zhat) per column with zhat = (z - mean) * rstd and
  dv = du * act'(zhat * scale + bias) -- the two reductions of BatchNorm's backward.

``batch_norm_act(z, scale, bias, eps=, act=)`` ties them into a ``custom_vjp`` that saves
only z (and the per-channel statistics): forward = statistics kernel + one XLA pass
writing act(BN(z)); backward = sums kernel + one XLA pass writing dz.  Under a mesh
(``jax.set_mesh``) each device's kernel reduces its own rows (``_sharding.map_batch``) and
the partial sums of all devices are added: the statistics are the global batch's.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common as cm
from pallas_kernels import _sharding

f32 = jnp.float32
ACTIVATIONS = (None, "silu")
MAX_BLOCK_COLS = 128
MIN_ROWS = 4096              # below this, implementation=None keeps XLA's reductions


class Tiles(NamedTuple):
  """block_rows: rows per tile (power of two); steps: tiles each program walks (its rows
  are contiguous); num_warps / num_stages: Triton's; fast_sigmoid: the backward kernel's
  SiLU derivative with ``_common.sigmoid(fast=True)`` (compiled kernels only; the
  interpreter always evaluates the exact expression)."""

  block_rows: int = 32
  steps: int = 8
  num_warps: int = 4
  num_stages: int = 1
  fast_sigmoid: bool = True


SUMS_TILES = Tiles()
BWD_TILES = Tiles()


def unsupported_reason(shape, dtype) -> str | None:
  if len(shape) != 2:
    return f"expects (rows, channels), got shape {tuple(shape)}"
  if shape[0] < 1 or shape[1] < 1:
    return f"needs at least one row and one channel, got shape {tuple(shape)}"
  if jnp.dtype(dtype) not in (jnp.dtype(f32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"float32/bfloat16/float16 input, got {jnp.dtype(dtype).name}"
  if math.prod(shape) + shape[-1] * 1024 >= 2**31:
    return f"input of shape {tuple(shape)} is too large for int32 offsets"
  return None


def _block_cols(c: int) -> int:
  """Columns per program: the largest power of two dividing C, at most 128 (rows of a tile
  are then contiguous, aligned vectors)."""
  return min(MAX_BLOCK_COLS, c & -c)


def _tile(ref, m, c, bc, row0, j, br):
  """(mask, float32 tile) of rows row0 .. row0 + br, columns of block j; rows past the end
  read 0."""
  rows = row0 + jnp.arange(br, dtype=jnp.int32)
  ok = (rows < m)[:, None]
  offs = (jnp.where(rows < m, rows, 0)[:, None] * c
          + (j * bc + jnp.arange(bc, dtype=jnp.int32))[None, :])
  return ok, plgpu.load(ref.at[offs], mask=ok, other=0).astype(f32)


def _sums_kernel(z_ref, s1_ref, s2_ref, *, m, c, tiles):
  bc, br = _block_cols(c), tiles.block_rows
  j, r = pl.program_id(0), pl.program_id(1)

  def step(i, acc):
    _, z = _tile(z_ref, m, c, bc, (r * tiles.steps + i) * br, j, br)
    return acc[0] + z, acc[1] + z * z

  zero = jnp.zeros((br, bc), f32)
  a1, a2 = lax.fori_loop(0, tiles.steps, step, (zero, zero))
  s1_ref[pl.ds(r * c + j * bc, bc)] = jnp.sum(a1, axis=0)
  s2_ref[pl.ds(r * c + j * bc, bc)] = jnp.sum(a2, axis=0)


def _act_grad(v, act, fast: bool = False):
  if act is None:
    return jnp.ones_like(v)
  sig = cm.sigmoid(v, fast=fast)
  return sig * (1.0 + v * (1.0 - sig))


def _bwd_sums_kernel(z_ref, du_ref, mean_ref, rstd_ref, scale_ref, bias_ref, s1_ref, s2_ref,
                     *, m, c, tiles, act, exact_act):
  bc, br = _block_cols(c), tiles.block_rows
  j, r = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(j * bc, bc)
  mean, rstd = mean_ref[cols][None, :], rstd_ref[cols][None, :]
  scale, bias = scale_ref[cols][None, :], bias_ref[cols][None, :]

  def step(i, acc):
    row0 = (r * tiles.steps + i) * br
    ok, z = _tile(z_ref, m, c, bc, row0, j, br)
    _, du = _tile(du_ref, m, c, bc, row0, j, br)
    zhat = jnp.where(ok, (z - mean) * rstd, 0.0)
    dv = du * _act_grad(zhat * scale + bias, act, tiles.fast_sigmoid and not exact_act)
    return acc[0] + dv, acc[1] + dv * zhat

  zero = jnp.zeros((br, bc), f32)
  a1, a2 = lax.fori_loop(0, tiles.steps, step, (zero, zero))
  s1_ref[pl.ds(r * c + j * bc, bc)] = jnp.sum(a1, axis=0)
  s2_ref[pl.ds(r * c + j * bc, bc)] = jnp.sum(a2, axis=0)


def _call(kernel, name, z2d, extra, vectors, interpret, tiles, **kw):
  m, c = z2d.shape
  cols = c // _block_cols(c)
  programs = cm.cdiv(m, tiles.block_rows * tiles.steps)
  part = jax.ShapeDtypeStruct((programs * c,), f32)
  s1, s2 = pl.pallas_call(
      functools.partial(kernel, m=m, c=c, tiles=tiles, **kw),
      out_shape=(part, part), grid=(cols, programs),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret, name=name,
  )(z2d.reshape(-1), *(a.reshape(-1) for a in extra), *vectors)
  return s1.reshape(programs, c), s2.reshape(programs, c)


def column_sums(z2d: jax.Array, *, batch: int = 1, interpret: bool = False,
                tiles: Tiles | None = None):
  """(sum over rows of z, of z^2), float32 (C,) each, of (M, C) rows by the Pallas kernel.
  ``batch``: the images the rows belong to (whole images' pixels in order), for the
  per-device split under a mesh."""
  s1, s2 = _sharding.map_batch(
      lambda z: _call(_sums_kernel, "batch_norm_sums", z, (), (), interpret,
                      tiles or SUMS_TILES),
      (z2d,), batch=batch)
  return s1.sum(0), s2.sum(0)


def _bwd_sums(z2d, du2d, mean, rstd, scale, bias, act, batch, interpret, tiles=None):
  vecs = tuple(v.astype(f32) for v in (mean, rstd, scale, bias))
  s1, s2 = _sharding.map_batch(
      lambda z, du, *v: _call(_bwd_sums_kernel, "batch_norm_bwd_sums", z, (du,), v,
                              interpret, tiles or BWD_TILES, act=act,
                              exact_act=interpret),
      (z2d, du2d), vecs, batch=batch)
  return s1.sum(0), s2.sum(0)


# ----------------------------------------------------------------- XLA counterparts


def _xla_sums(z2d):
  z = z2d.astype(f32)
  return z.sum(0), jnp.square(z).sum(0)


def _xla_bwd_sums(z2d, du2d, mean, rstd, scale, bias, act):
  zhat = (z2d.astype(f32) - mean) * rstd
  dv = du2d.astype(f32) * _act_grad(zhat * scale.astype(f32) + bias.astype(f32), act)
  return dv.sum(0), (dv * zhat).sum(0)


# ------------------------------------------------------------------- BatchNorm + act


def _apply_act(v, act):
  return v if act is None else jax.nn.silu(v)


def _stats(z2d, use_pallas, batch, interpret):
  m = z2d.shape[0]
  s1, s2 = (column_sums(z2d, batch=batch, interpret=interpret) if use_pallas
            else _xla_sums(z2d))
  mean = s1 / m
  return mean, jnp.maximum(0.0, s2 / m - jnp.square(mean))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _bn_act(z2d, scale, bias, eps, act, use_pallas, batch, interpret):
  return _bn_act_fwd(z2d, scale, bias, eps, act, use_pallas, batch, interpret)[0]


def _bn_act_fwd(z2d, scale, bias, eps, act, use_pallas, batch, interpret):
  mean, var = _stats(z2d, use_pallas, batch, interpret)
  s = scale.astype(f32) * lax.rsqrt(var + eps)
  t = bias.astype(f32) - mean * s
  y = _apply_act(z2d.astype(f32) * s + t, act).astype(z2d.dtype)
  return (y, mean, var), (z2d, scale, bias, mean, var)


def _bn_act_bwd(eps, act, use_pallas, batch, interpret, res, cts):
  z2d, scale, bias, mean, var = res
  dy, dmean, dvar = cts
  m = z2d.shape[0]
  rstd = lax.rsqrt(var + eps)
  dy = dy.astype(z2d.dtype)
  if use_pallas:
    dbias, dscale = _bwd_sums(z2d, dy, mean, rstd, scale, bias, act, batch, interpret)
  else:
    dbias, dscale = _xla_bwd_sums(z2d, dy, mean, rstd, scale, bias, act)
  sf, bf = scale.astype(f32), bias.astype(f32)
  zc = z2d.astype(f32) - mean
  zhat = zc * rstd
  dv = dy.astype(f32) * _act_grad(zhat * sf + bf, act)
  # BatchNorm's input gradient with batch statistics, plus the statistics' own cotangents
  # (zero in training, where they only feed the running averages through stop_gradient).
  dz = sf * rstd * (dv - (dbias + zhat * dscale) / m) + dmean / m + dvar * (2.0 / m) * zc
  return dz.astype(z2d.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_bn_act.defvjp(_bn_act_fwd, _bn_act_bwd)


def picks_pallas(shape, dtype, batch: int = 1, interpret: bool = False) -> bool:
  """``implementation=None``'s choice: the kernels for supported inputs of at least
  ``MIN_ROWS`` rows per device on a GPU (or in the interpreter)."""
  rows = shape[0] // max(batch, 1) * _sharding.local_batch(batch) if batch else shape[0]
  return (unsupported_reason(shape, dtype) is None and rows >= MIN_ROWS
          and (interpret or jax.default_backend() == "gpu"))


def batch_norm_act(z2d: jax.Array, scale: jax.Array, bias: jax.Array, *, eps: float = 1e-5,
                   act: str | None = None, batch: int = 1,
                   implementation: str | None = None, interpret: bool = False):
  """act(BatchNorm(z)) with batch statistics over the rows of ``z2d`` (M, C): returns
  (y in z's dtype, batch mean, batch (biased) variance), the statistics float32 as
  ``flax.nnx.BatchNorm`` computes them.  Differentiable in z, scale and bias (and the
  statistics).  act: None or "silu".  batch: the images the rows are the pixels of (for
  the per-device split under a mesh; 1 means rows are not split).

  implementation: "pallas" -- the reductions as Pallas-Triton kernels (ValueError naming
  the reason for an unsupported shape or dtype, NotImplementedError off a GPU without
  ``interpret``); "xla" -- the same custom_vjp with XLA reductions; None --
  "pallas" on a GPU for at least ``MIN_ROWS`` rows per device, else "xla"."""
  if act not in ACTIVATIONS:
    raise ValueError(f"batch_norm_act: act must be one of {ACTIVATIONS}, got {act!r}")
  if implementation not in (None, "xla", "pallas"):
    raise ValueError(f"batch_norm_act: implementation must be None, 'xla' or 'pallas', got "
                     f"{implementation!r}")
  if z2d.ndim != 2:
    raise ValueError(f"batch_norm_act expects (rows, channels), got shape {z2d.shape}")
  c = z2d.shape[1]
  if tuple(scale.shape) != (c,) or tuple(bias.shape) != (c,):
    raise ValueError(f"batch_norm_act: scale and bias must be ({c},), got "
                     f"{tuple(scale.shape)} and {tuple(bias.shape)}")
  if implementation is None:
    use_pallas = picks_pallas(z2d.shape, z2d.dtype, batch, interpret)
  elif implementation == "pallas":
    reason = unsupported_reason(z2d.shape, z2d.dtype)
    if reason is not None:
      raise ValueError(f"batch_norm_act: {reason}")
    if not interpret and jax.default_backend() != "gpu":
      raise NotImplementedError(
          f"batch_norm_act(implementation='pallas'): the Pallas kernels need a GPU backend "
          f"(the default JAX backend is {jax.default_backend()!r}); pass interpret=True to "
          f"run them in the interpreter")
    use_pallas = True
  else:
    use_pallas = False
  return _bn_act(z2d, scale, bias, float(eps), act, use_pallas, int(batch), bool(interpret))
