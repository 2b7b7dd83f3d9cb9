"""LayerNorm over the channel (last) axis as Pallas-Triton kernels, forward and backward.

ConvNeXt's stem and downsampling layers normalise full-resolution activations (the stem's
LN and the first downsampling LN each see batch x 56 x 56 x 96 at 224x224).  XLA lowers
``nnx.LayerNorm`` there to several passes: in ConvNeXt-T's training step at batch 256 on
an H100 (2026-11-26, ``benchmarks.kernel_profile``), the statistics of each of those two
LNs took a ~100 us reduction pass and the normalisation a ~115 us pass, and the backward
two ~160 us reductions plus the input- and parameter-gradient passes (~200-260 us) -- about
1.4 ms per step, several times the DRAM traffic of the data (x and y: 154 MB each).

Here each program owns ``block_rows`` rows with all their channels in registers (as chunks
of the largest power of two dividing C, so loads and stores are contiguous vectors): the forward reads x once and writes y once (statistics in
float32, two-pass variance); the backward reads x and dy once, recomputes the statistics,
writes dx once and per-program partial sums of dy * xhat and dy (the gradients of the scale
and bias), which a small XLA sum finishes.  Nothing but x is saved for the backward.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common as cm
from pallas_kernels import _sharding

f32 = jnp.float32
MAX_CHANNELS = 2048          # a row must fit one program's registers
MAX_CHUNKS = 32              # C / (largest power of two dividing C): unrolled chunks
TILE_ELEMENTS = 8192         # rows x padded channels per program (forward; half backward)
MIN_ROWS = 4096              # below this, implementation=None keeps XLA's LN


def unsupported_reason(shape, dtype) -> str | None:
  if len(shape) < 1 or shape[-1] < 1:
    return f"needs an input with a channel (last) axis, got shape {tuple(shape)}"
  if shape[-1] > MAX_CHANNELS:
    return f"at most {MAX_CHANNELS} channels, got {shape[-1]}"
  if shape[-1] // _chunk(shape[-1]) > MAX_CHUNKS:
    return (f"C={shape[-1]} splits into {shape[-1] // _chunk(shape[-1])} chunks of "
            f"{_chunk(shape[-1])} channels (its largest power-of-two factor); at most "
            f"{MAX_CHUNKS}")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                              jnp.dtype(jnp.float16)):
    return f"float32/bfloat16/float16 input, got {jnp.dtype(dtype).name}"
  if math.prod(shape) + shape[-1] * 128 >= 2**31:
    return f"input of shape {tuple(shape)} is too large for int32 offsets"
  return None


def _chunk(c: int) -> int:
  """Channels per register chunk: the largest power of two dividing C, at most 128.  Each
  chunk is loaded as (rows, chunk) with offsets row * C + j * chunk + arange(chunk), which
  Triton sees as contiguous and aligned (vector loads); one padded, masked power-of-two
  tile over all C channels at C=96 was 2x slower than XLA (H100, 2026-11-26)."""
  return min(128, c & -c)


def _rows(m, block_rows, pid):
  """(row mask, rows to load from, rows to store to): masked rows load row 0 and store past
  the end (row m), as a row index, so that offsets stay contiguous along the channels (the
  interpreter applies masked stores as scatters, so an in-bounds dummy would be
  overwritten)."""
  rows = pid * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
  ok = rows < m
  return ok[:, None], jnp.where(ok, rows, 0), jnp.where(ok, rows, m)


def _offsets(rows, c, j, cw):
  return rows[:, None] * c + (j * cw + jnp.arange(cw, dtype=jnp.int32))[None, :]


def _load_chunks(ref, ok, rows, c, cw):
  return [plgpu.load(ref.at[_offsets(rows, c, j, cw)], mask=ok, other=0).astype(f32)
          for j in range(c // cw)]


def _row_sum(chunks):
  return sum(jnp.sum(v, axis=1, keepdims=True) for v in chunks)


def _stats(xs, c, eps):
  mean = _row_sum(xs) * (1.0 / c)
  ds = [x - mean for x in xs]
  var = _row_sum([d * d for d in ds]) * (1.0 / c)
  return ds, lax.rsqrt(var + eps)


def _param(ref, j, cw):
  return ref[pl.ds(j * cw, cw)][None, :]


def _fwd_kernel(x_ref, s_ref, b_ref, y_ref, *, m, c, block_rows, eps):
  cw = _chunk(c)
  ok, rows, out_rows = _rows(m, block_rows, pl.program_id(0))
  ds, rstd = _stats(_load_chunks(x_ref, ok, rows, c, cw), c, eps)
  for j, d in enumerate(ds):
    y = d * rstd * _param(s_ref, j, cw) + _param(b_ref, j, cw)
    plgpu.store(y_ref.at[_offsets(out_rows, c, j, cw)], y.astype(y_ref.dtype), mask=ok)


def _bwd_kernel(x_ref, dy_ref, s_ref, dx_ref, ds_ref, db_ref, *, m, c, block_rows, eps):
  cw = _chunk(c)
  pid = pl.program_id(0)
  ok, rows, out_rows = _rows(m, block_rows, pid)
  ds, rstd = _stats(_load_chunks(x_ref, ok, rows, c, cw), c, eps)
  dys = _load_chunks(dy_ref, ok, rows, c, cw)
  # Rows past the end loaded x = 0, dy = 0: xhat and every sum below are 0 there.
  xhats = [jnp.where(ok, d * rstd, 0.0) for d in ds]
  gs = [dy * _param(s_ref, j, cw) for j, dy in enumerate(dys)]
  mg = _row_sum(gs) * (1.0 / c)
  mgx = _row_sum([g * xh for g, xh in zip(gs, xhats)]) * (1.0 / c)
  for j, (g, xh, dy) in enumerate(zip(gs, xhats, dys)):
    dx = rstd * (g - mg - xh * mgx)
    plgpu.store(dx_ref.at[_offsets(out_rows, c, j, cw)], dx.astype(dx_ref.dtype), mask=ok)
    ds_ref[pl.ds(pid * c + j * cw, cw)] = jnp.sum(dy * xh, axis=0)
    db_ref[pl.ds(pid * c + j * cw, cw)] = jnp.sum(dy, axis=0)


def _block_rows(c: int, tile_elements: int) -> int:
  """Rows per program: a power of two with about ``tile_elements`` elements (>= 1)."""
  return max(1, pl.next_power_of_2(max(1, tile_elements // c) + 1) // 2)


def _forward(x2, scale, bias, eps, out_dtype, interpret):
  m, c = x2.shape
  br = _block_rows(c, TILE_ELEMENTS)
  y = pl.pallas_call(
      functools.partial(_fwd_kernel, m=m, c=c, block_rows=br, eps=eps),
      out_shape=jax.ShapeDtypeStruct((m * c,), out_dtype),
      grid=(cm.cdiv(m, br),),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret, name="layer_norm_fwd",
  )(x2.reshape(-1), scale.astype(f32), bias.astype(f32))
  return y.reshape(m, c)


def _backward(x2, dy2, scale, eps, interpret):
  m, c = x2.shape
  br = _block_rows(c, TILE_ELEMENTS // 2)
  programs = cm.cdiv(m, br)
  dx, ds, db = pl.pallas_call(
      functools.partial(_bwd_kernel, m=m, c=c, block_rows=br, eps=eps),
      out_shape=(jax.ShapeDtypeStruct((m * c,), x2.dtype),
                 jax.ShapeDtypeStruct((programs * c,), f32),
                 jax.ShapeDtypeStruct((programs * c,), f32)),
      grid=(programs,),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret, name="layer_norm_bwd",
  )(x2.reshape(-1), dy2.reshape(-1), scale.astype(f32))
  return (dx.reshape(m, c), ds.reshape(programs, c).sum(0), db.reshape(programs, c).sum(0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _ln(x2, scale, bias, eps, out_dtype, interpret):
  return _forward(x2, scale, bias, eps, out_dtype, interpret)


def _ln_fwd(x2, scale, bias, eps, out_dtype, interpret):
  return _forward(x2, scale, bias, eps, out_dtype, interpret), (x2, scale, bias)


def _ln_bwd(eps, out_dtype, interpret, saved, dy):
  x2, scale, bias = saved
  dx, ds, db = _backward(x2, dy.astype(x2.dtype), scale, eps, interpret)
  return dx, ds.astype(scale.dtype), db.astype(bias.dtype)


_ln.defvjp(_ln_fwd, _ln_bwd)


def picks_pallas(shape, dtype, interpret: bool = False) -> bool:
  """``implementation=None``'s choice: the kernels for supported inputs of at least
  ``MIN_ROWS`` rows per device (under a mesh, ``_sharding.local_batch``) on a GPU (or in the
  interpreter)."""
  rows = math.prod(shape) // max(shape[-1], 1)
  if len(shape) > 1 and shape[0]:
    rows = rows // shape[0] * _sharding.local_batch(shape[0])
  return (unsupported_reason(shape, dtype) is None
          and rows >= MIN_ROWS
          and (interpret or jax.default_backend() == "gpu"))


def layer_norm_reference(x, scale, bias, eps: float = 1e-6, out_dtype=None):
  """Plain jnp (float32 statistics, two-pass variance), the kernels' reference."""
  xf = x.astype(f32)
  mean = xf.mean(-1, keepdims=True)
  d = xf - mean
  y = d * lax.rsqrt(jnp.square(d).mean(-1, keepdims=True) + eps)
  y = y * scale.astype(f32) + bias.astype(f32)
  return y.astype(out_dtype or x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, eps: float = 1e-6,
               out_dtype=None, implementation: str | None = "pallas",
               interpret: bool = False) -> jax.Array:
  """LayerNorm of ``x`` over its last axis with ``scale`` and ``bias`` (C,), float32
  statistics, result in ``out_dtype`` (default x's dtype); differentiable (Pallas backward).

  implementation: "pallas" (raises ValueError naming the reason where unsupported), "xla"
  (``layer_norm_reference``), or None: Pallas on a GPU for at least ``MIN_ROWS`` rows, XLA
  otherwise."""
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  c = x.shape[-1]
  if tuple(scale.shape) != (c,) or tuple(bias.shape) != (c,):
    raise ValueError(f"layer_norm: scale and bias must be ({c},), got {tuple(scale.shape)} "
                     f"and {tuple(bias.shape)}")
  if implementation not in (None, "xla", "pallas"):
    raise ValueError(f"layer_norm: implementation must be None, 'xla' or 'pallas', got "
                     f"{implementation!r}")
  if implementation is None:
    implementation = "pallas" if picks_pallas(x.shape, x.dtype, interpret) else "xla"
  if implementation == "xla":
    return layer_norm_reference(x, scale, bias, eps, out_dtype)
  reason = unsupported_reason(x.shape, x.dtype)
  if reason is not None:
    raise ValueError(f"layer_norm: {reason}")
  eps, interpret = float(eps), bool(interpret)
  y = _sharding.map_batch(lambda x2, s, b: _ln(x2, s, b, eps, out_dtype, interpret),
                          (x.reshape(-1, c),), (scale, bias),
                          batch=x.shape[0] if x.ndim > 1 else 1)
  return y.reshape(x.shape)
