"""The pointwise half of a residual block as one Mosaic GPU kernel (Hopper: TMA + wgmma).

    y[r] = res[r] + row_scale[r] * (act(norm(z[r] + zb) @ W1 + b1) @ W2 + b2)

for every row r of (M, C) activations, where ``norm`` is a LayerNorm without its affine
part (or the identity) and ``act`` is GELU (erf form) or SiLU.  This is the whole ConvNeXt
block after its depthwise conv (LN -> Dense C->4C -> GELU -> Dense 4C->C -> layer scale ->
+ x, with the LN affine folded into W1/b1 and the layer scale into W2/b2 by the caller) and
the whole ConvFirst block after its grouped conv (1x1 expand -> SiLU -> 1x1 project -> + x).
The E-wide hidden activation never leaves the SM: it lives in registers between the two
tensor-core matmuls.

Why Mosaic GPU and not Pallas-Triton (pallas_triton.py has a Triton version of the whole
ConvNeXt block): Triton-lowered Pallas cannot place a tile in shared memory explicitly or
issue wgmma with a register operand; its version re-read the weights from L2 for every
small dot and ran the MLP at 13x its floor (benchmarks/RESULTS.md).  Here one CTA (one
warpgroup, 64 rows) loads its z/res tiles once with TMA, normalises z in place in its
swizzled shared-memory tile (so that three C=96 CTAs fit an SM), and then streams (hidden chunk x C) slices of W1^T and W2 through a
double-buffered TMA pipeline (``plgpu.emit_pipeline``): per chunk one wgmma (64 x C x hc)
gives the hidden chunk in registers, bias + activation are applied there, and a second
wgmma with that chunk as its register operand accumulates into the (64 x C) float32 output
accumulator, which stays in registers for the whole loop.  ``block_m=128`` runs two such
compute warpgroups of 64 rows per CTA sharing every weight chunk, fed by a third warpgroup
that only issues the TMA copies (``_kernel_ws``); faster where one 64-row CTA would fill
shared memory alone (C=192: 0.397 vs 0.457 ms per block on an H200), slower elsewhere.
Where both weights fit in shared memory beside two or three 64-row tiles (C=96 with E=384
and below) the default is ``_kernel_resident``: persistent CTAs, one per SM, load W1^T and
W2 once and their compute warpgroups walk 64-row tiles against them, instead of every
64-row CTA streaming all 147 KB of weights from L2 (C=96, E=384: 0.206 vs 0.252 ms with
SiLU, 0.255 vs 0.279 with LayerNorm + GELU, batch 128 at 56x56, H100 2026-11-27).

Limits (checked by ``unsupported_reason``; callers fall back to XLA or to the Triton
kernels): bfloat16/float16 activations only (wgmma takes 16-bit operands; float32 would run
as tf32, which is not the float32 the references promise), C a multiple of 32 and at most
256 (the 64 x C float32 accumulator must fit in registers next to the hidden chunk), E a
multiple of the hidden chunk, which must be a multiple of 64 (it is the second wgmma's K;
32 fails to lower).  Wider blocks (C = 384, 768, ...) run as two kernels with the hidden
activation through DRAM: ``pallas_kernels.mosaic_split``.  M need not be a multiple of 64: the wrapper pads the rows.
Runs in the Mosaic GPU interpreter on CPU with ``interpret=True`` (slow; tests use tiny
shapes).
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _switches

BLOCK_M = 64  # default rows per CTA: one warpgroup's wgmma M (128: two warpgroups)
# "gelu_tanh" (tanh approximation) and "identity" exist to time the activation's cost.
ACTIVATIONS = ("gelu", "silu", "gelu_tanh", "identity")
MAX_CHANNELS = 256


def _swizzle_bytes(minor: int, itemsize: int) -> int:
  """Largest TMA/wgmma swizzle (128, 64 or 32 bytes) that divides one row of ``minor``."""
  row = minor * itemsize
  for s in (128, 64, 32):
    if row % s == 0:
      return s
  raise ValueError(f"a row of {minor} x {itemsize} bytes is not a multiple of 32 bytes")


def _transforms(minor: int, dtype) -> tuple:
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = _swizzle_bytes(minor, itemsize)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _recip_pos(q):
  """1 / q for q > 0 as rsqrt(q)**2: with approx_math Mosaic GPU lowers rsqrt to one
  rsqrt.approx.f32 (about 2^-22 relative error; squared, ~2.4e-7), whereas ``/`` is an IEEE
  division (a multi-instruction sequence).  Used by SiLU (H100 2026-11-26, batch 128: the
  C=64 ConvFirst MLP kernel 0.126 vs 0.132 ms) and the GELU; q = inf gives 0."""
  r = lax.rsqrt(q)
  return r * r


# GELU(x) = x Phi(x) = x sigmoid(g(x)) with g = logit(Phi), an odd function, and
# g(x) ~ x P(x^2), P of degree 6: a minimax fit of |x Phi (1 - Phi) (fit - g)| / max(1, |x|)
# (the GELU's absolute error per unit error in g) on [0, 6] (benchmarks/fit_gelu.py); g > 0
# and increasing on (0, 1e6) were checked, so the form saturates to x and to 0 correctly.
_GELU_LOGIT = (1.5957706151316369, 0.07266412971428038, -6.348295358735991e-05,
               -0.00011120790170396572, 8.025201711745978e-06, -2.7146085019479464e-07,
               3.6933226604161373e-09)
_GELU_EXP2 = tuple(-c / math.log(2.0) for c in _GELU_LOGIT)  # exp(-g(x)) = exp2(x Q(x^2))


def _gelu(x):
  """GELU, erf form, to ~3e-7 x max(1, |x|) absolute in float32 (a few ulp; the test allows
  1e-6).  Mosaic GPU lowers exp2 and rsqrt (one MUFU instruction each with approx_math);
  lax.erf fails its layout inference (jax 0.11.2: "No layout inference rule defined for
  math.erf").  Per element: one exp2, one rsqrt (the reciprocal as rsqrt(q)^2,
  ``_recip_pos``) and ~10 FP32 ops -- two MUFU ops at 16 per SM per clock (against 128
  FMAs) likely bound it.  H100 2026-11-26, batch 128: the C=96 fused kernel 0.272-0.275 ms
  vs 0.300-0.310 with the Abramowitz & Stegun erf used before (an IEEE division, an exp and
  ~12 FP32 ops), 0.231-0.233 with the tanh form (one MUFU op, but a different function:
  4.7e-4 absolute, 2% relative in the negative tail), 0.220 with the identity; C=192: 0.177
  vs 0.197-0.201.  The fit: ``benchmarks/fit_gelu.py``."""
  t = x * x
  q = _GELU_EXP2[-1]
  for c in _GELU_EXP2[-2::-1]:
    q = q * t + c
  return x * _recip_pos(1.0 + jnp.exp2(q * x))


def _gelu_and_grad(x):
  """(GELU(x), GELU'(x)) of the same fit as ``_gelu``, for the backward kernel.  With
  u = x P(x^2) (the fitted logit of Phi), e = exp(-u) and s = 1 / (1 + e):
  GELU = x s and GELU' = s + x s (1 - s) u' = s + x e s^2 (P(x^2) + 2 x^2 P'(x^2)), the
  derivative of the fitted function itself (no second exp; 1 - s as e s, without
  cancellation).  The exponent is clamped at 2^126 so that e s^2 stays finite (x below
  about -9: GELU and GELU' are 0 to float32 there anyway), and u' is evaluated at x clipped
  to [-10, 10], where e s^2 has long underflowed to 0 (so a huge |x| cannot turn it into
  inf * 0)."""
  t = x * x
  q = _GELU_EXP2[-1]
  for c in _GELU_EXP2[-2::-1]:
    q = q * t + c
  e = jnp.exp2(jnp.minimum(q * x, 126.0))
  s = _recip_pos(1.0 + e)
  xc = jnp.minimum(jnp.maximum(x, -10.0), 10.0)
  tc = xc * xc
  du = (2 * len(_GELU_LOGIT) - 1) * _GELU_LOGIT[-1]
  for k in range(len(_GELU_LOGIT) - 2, -1, -1):
    du = du * tc + (2 * k + 1) * _GELU_LOGIT[k]
  return x * s, s + xc * (e * s * s) * du


def _silu_and_grad(x):
  """(SiLU(x), SiLU'(x)) = (x s, s (1 + x (1 - s))) with s = sigmoid(x) and 1 - s = e s,
  e = exp(-x) (its argument clamped at 87 so that e stays finite)."""
  e = jnp.exp(jnp.minimum(-x, 87.0))
  s = _recip_pos(1.0 + e)
  return x * s, s * (1.0 + x * (e * s))


def _activation_and_grad(h, act: str):
  if act == "gelu":
    return _gelu_and_grad(h)
  if act == "silu":
    return _silu_and_grad(h)
  raise ValueError(f"the backward kernel's activation must be 'gelu' or 'silu', got {act!r}")


def _activation(h, act: str):
  if act == "gelu":
    return _gelu(h)
  if act == "silu":
    return h * _recip_pos(1.0 + jnp.exp(-h))
  if act == "gelu_tanh":
    return 0.5 * h * (1.0 + jnp.tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
  if act == "identity":
    return h
  raise ValueError(f"activation must be one of {ACTIVATIONS}, got {act!r}")


def device_unsupported_reason(interpret: bool) -> str | None:
  """Why the kernel cannot run on the default device (None: it can).  wgmma and TMA as
  used here are Hopper (sm_90) instructions; the interpreter runs anywhere."""
  if interpret:
    return None
  if jax.default_backend() != "gpu":
    return (f"the Mosaic GPU kernel needs a GPU backend (got {jax.default_backend()!r}); "
            f"pass interpret=True to run it in the interpreter")
  cap = str(getattr(jax.devices()[0], "compute_capability", ""))
  if not cap.startswith("9."):
    return f"the Mosaic GPU kernel needs a Hopper GPU (compute capability 9.x), got {cap!r}"
  return None


SMEM_BYTES = 227 * 1024  # Hopper's shared memory per CTA (opt-in maximum)


def pipelined_smem_bytes(c: int, hc: int, stages: int, itemsize: int = 2,
                         bm: int = BLOCK_M) -> int:
  """Shared memory of ``_kernel`` with ``pipelined=True`` on a GPU: the z and residual
  tiles, ``stages`` slots of two hidden chunks of W1^T and W2 (and b1), the row scale and
  the two bias vectors.  At C=192, hc=64, 2 stages: 246,528 + 1,792 (the compiler reported
  249,912 with its alignment and barriers, H100 2026-11-26) -- over the limit."""
  return (2 * bm * c * itemsize + stages * (2 * 2 * hc * c * itemsize + 2 * hc * 4)
          + bm * 4 + 2 * c * 4)


def fused_smem_bytes(c: int, e: int, hc: int, stages: int, bm: int = BLOCK_M,
                     itemsize: int = 2, h_in_smem: bool = False) -> int:
  """Shared memory of ``fused_mlp``'s serial kernels on a GPU: the z and residual (or
  normalised) tiles, ``stages`` slots of a hidden chunk of W1^T and of W2, the biases and
  the row scale (and the hidden chunk where ``h_in_smem``).  128-row CTAs
  (``_kernel_ws``) keep all of b1.  At C=256, E=1024, 128 rows, 2 stages: 268,800 bytes
  (the compiler reported 271,480 with its alignment and barriers, H200 2026-11-27) -- over
  the limit, which the ConvNeXt tile table used to ask for (``tuning._heuristic_tiles``)."""
  tiles = 2 * bm * c * itemsize + stages * 2 * hc * c * itemsize + bm * 4 + 2 * c * 4
  b1 = e * 4 if bm == 128 else stages * hc * 4
  return tiles + b1 + (bm * hc * itemsize if h_in_smem else 0)


# Headroom for barriers and the compiler's alignment (2,680 bytes measured at C=256).
_SMEM_SLACK = 4096


def unsupported_reason(m: int, c: int, e: int, dtype, hidden_chunk: int = 64, *,
                       block_m: int | None = None, stages: int | None = None) -> str | None:
  """Why ``fused_mlp`` cannot run this shape/dtype, or None; with ``block_m`` and
  ``stages`` also whether that configuration fits a CTA's shared memory."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return (f"the Mosaic GPU kernel takes bfloat16/float16 activations (wgmma operands), "
            f"got {jnp.dtype(dtype).name}")
  if c % 32 or c > MAX_CHANNELS:
    return (f"the Mosaic GPU kernel needs the channel count to be a multiple of 32 and at "
            f"most {MAX_CHANNELS}, got C={c}")
  if hidden_chunk % 64:
    return f"the hidden chunk must be a multiple of 64 (the second wgmma's K), got {hidden_chunk}"
  if e % hidden_chunk:
    return f"hidden width {e} is not a multiple of the hidden chunk {hidden_chunk}"
  if m <= 0:
    return f"no rows (M={m})"
  if block_m is not None and stages is not None:
    need = fused_smem_bytes(c, e, hidden_chunk, stages, block_m, jnp.dtype(dtype).itemsize)
    if need + _SMEM_SLACK > SMEM_BYTES:
      return (f"C={c}, E={e} with {block_m}-row CTAs, hidden_chunk={hidden_chunk} and "
              f"stages={stages} needs ~{need:,} bytes of shared memory, more than the "
              f"{SMEM_BYTES:,} a CTA can have; use fewer stages or 64-row CTAs")
  return None


_WG = plgpu.Layout.WGMMA


def _normalise_into(z_smem, zb_smem, zn_smem, *, normalize: bool, eps: float):
  """zn_smem <- LN(z + zb) (or z + zb) in zn_smem's dtype, fenced for the tensor cores."""
  rows, c = z_smem.shape
  z = plgpu.load(z_smem, layout=_WG).astype(jnp.float32)
  zb = plgpu.load(zb_smem, layout=_WG.reduce(0))
  z = z + lax.broadcast_in_dim(zb, (rows, c), [1])
  if normalize:
    mean = z.sum(axis=1) * (1.0 / c)
    d = z - lax.broadcast_in_dim(mean, (rows, c), [0])
    var = (d * d).sum(axis=1) * (1.0 / c)
    z = d * lax.broadcast_in_dim(lax.rsqrt(var + eps), (rows, c), [0])
  zn_smem[...] = z.astype(zn_smem.dtype)
  plgpu.commit_smem()  # visible to the tensor cores; orders the reads of z_smem before any TMA


def _activate(h, b1_ref, act: str, dtype, row_mask_ref=None):
  """act(h + b1) in ``dtype``: the hidden chunk's bias and activation, in registers;
  with ``row_mask_ref`` (rows,) act(h + row_mask * b1)."""
  rows, hc = h.shape
  b1 = lax.broadcast_in_dim(plgpu.load(b1_ref, layout=_WG.reduce(0)), (rows, hc), [1])
  if row_mask_ref is not None:
    mask = plgpu.load(row_mask_ref, layout=_WG.reduce(1))
    b1 = b1 * lax.broadcast_in_dim(mask, (rows, hc), [0])
  return _activation(h + b1, act).astype(dtype)


def _project(acc2_ref, h, w2_smem, h_smem):
  """Issues acc2 += h @ W2-chunk with the activated chunk as wgmma's register operand
  (h_smem None) or through h_smem (not awaited)."""
  if h_smem is None:
    plgpu.wgmma(acc2_ref, h, w2_smem)
  else:
    h_smem[...] = h
    plgpu.commit_smem()
    plgpu.wgmma(acc2_ref, h_smem, w2_smem)


def _hidden_chunk(acc2_ref, zn_smem, w1t_smem, b1_ref, w2_smem, h_smem, *, act: str,
                  wait_w2=None):
  """acc2 += act(zn @ W1[:, chunk] + b1[chunk]) @ W2[chunk, :] for one hidden chunk, the
  activated chunk passed as wgmma's register operand (h_smem None) or through h_smem.
  ``wait_w2``: called between the two matmuls (the W2 chunk's TMA barrier)."""
  rows, hc = zn_smem.shape[0], w1t_smem.shape[0]

  def mm1(acc_ref):
    plgpu.wgmma(acc_ref, zn_smem, w1t_smem.transpose((1, 0)))
    return acc_ref[...]
  h = _activate(pl.run_scoped(mm1, plgpu.ACC((rows, hc), jnp.float32)), b1_ref, act,
                zn_smem.dtype)
  if wait_w2 is not None:
    wait_w2()
  _project(acc2_ref, h, w2_smem, h_smem)
  plgpu.wgmma_wait(0)  # the weight slots are refilled once the chunk returns


def _residual_out(acc, b2_smem, rs_smem, res_smem, out_gmem_rows, select_zero_rows=False,
                  has_res=True, wait=True):
  """res_smem <- res + rs * (acc + b2), then TMA it to ``out_gmem_rows``.
  ``select_zero_rows``: rows with rs == 0 get exactly res, even where acc is not finite.
  ``has_res=False``: no residual (res_smem is only the output staging tile).  ``wait``:
  wait for the store to complete (False: the caller waits before reusing res_smem)."""
  rows, c = acc.shape
  b2 = plgpu.load(b2_smem, layout=_WG.reduce(0))
  rs = lax.broadcast_in_dim(plgpu.load(rs_smem, layout=_WG.reduce(1)), (rows, c), [0])
  branch = (acc + lax.broadcast_in_dim(b2, (rows, c), [1])) * rs
  if select_zero_rows:
    branch = jnp.where(rs != 0, branch, jnp.zeros_like(branch))
  y = (plgpu.load(res_smem, layout=_WG).astype(jnp.float32) + branch if has_res
       else branch)
  res_smem[...] = y.astype(res_smem.dtype)  # the residual tile is the output staging tile
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(res_smem, out_gmem_rows)
  if wait:
    plgpu.wait_smem_to_gmem(0)


def _pipelined_chunks(acc2_ref, zn_smem, w1t_gmem, b1_gmem, w2_gmem, h_smem, *, c: int,
                      e: int, hc: int, act: str, stages: int):
  """acc2 += sum over hidden chunks of act(zn @ W1[:, j] + b1[j]) @ W2[j, :], two chunks per
  pipeline step so that a wgmma is in flight while each activation runs.

  Step k holds chunks a = 2k and b = 2k+1: issue both first matmuls (two accumulators), read
  a's with ``wgmma_accumulator_load(wait_n=1)`` (b's stays in flight), activate it, issue a's
  second matmul, read b's (a's second matmul stays in flight), activate it, issue b's second
  matmul.  Nothing is awaited at the end of the step, so the weight slots are released one
  step late (``delay_release=1``); the next step's first read retires the wgmmas that read
  them.  ``h_smem`` (the interpreter's path): one (rows x hc) tile per chunk of the pair,
  since a's tile is still being read when b's is written.  The interpreter runs wgmma
  synchronously (jax 0.11.2), so its race detector cannot see a slot refilled under an
  in-flight wgmma: that ordering rests on the argument above and on the GPU test."""
  dtype = zn_smem.dtype
  rows = zn_smem.shape[0]
  w_t = _transforms(c, dtype)

  def step(_, w1t_smem, b1_smem, w2_smem):
    def first(acc_a, acc_b):
      plgpu.wgmma(acc_a, zn_smem, w1t_smem.at[pl.ds(0, hc)].transpose((1, 0)))
      plgpu.wgmma(acc_b, zn_smem, w1t_smem.at[pl.ds(hc, hc)].transpose((1, 0)))
      for half, acc in enumerate((acc_a, acc_b)):
        h = _activate(plgpu.wgmma_accumulator_load(acc, wait_n=1),
                      b1_smem.at[pl.ds(half * hc, hc)], act, dtype)
        _project(acc2_ref, h, w2_smem.at[pl.ds(half * hc, hc)],
                 None if h_smem is None else h_smem.at[half])

    pl.run_scoped(first, plgpu.ACC((rows, hc), jnp.float32),
                  plgpu.ACC((rows, hc), jnp.float32))

  plgpu.emit_pipeline(
      step,
      grid=(e // (2 * hc),),
      in_specs=[
          plgpu.BlockSpec((2 * hc, c), lambda k: (k, 0), transforms=w_t, delay_release=1),
          plgpu.BlockSpec((2 * hc,), lambda k: (k,), delay_release=1),
          plgpu.BlockSpec((2 * hc, c), lambda k: (k, 0), transforms=w_t, delay_release=1),
      ],
      max_concurrent_steps=stages,
  )(w1t_gmem, b1_gmem, w2_gmem)


def _kernel(z_gmem, res_gmem, rs_gmem, zb_gmem, w1t_gmem, b1_gmem, w2_gmem, b2_gmem,
            out_gmem, *, c: int, e: int, hc: int, act: str, normalize: bool, eps: float,
            stages: int, h_in_smem: bool, bm: int, pipelined: bool = False,
            has_res: bool = True, select_zero_rows: bool = False):
  dtype = z_gmem.dtype
  i = lax.axis_index("m")
  rows = pl.ds(i * bm, bm)
  tile_t = _transforms(c, dtype)

  def scoped(z_smem, res_smem, rs_smem, zb_smem, b2_smem, bars, h_smem):
    plgpu.copy_gmem_to_smem(z_gmem.at[rows], z_smem, bars.at[0])
    if has_res:
      plgpu.copy_gmem_to_smem(res_gmem.at[rows], res_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(rs_gmem.at[rows], rs_smem, bars.at[2])
    plgpu.copy_gmem_to_smem(zb_gmem, zb_smem, bars.at[3])
    plgpu.copy_gmem_to_smem(b2_gmem, b2_smem, bars.at[4])
    plgpu.barrier_wait(bars.at[0])
    plgpu.barrier_wait(bars.at[3])
    # In place: each thread rewrites exactly the elements it loaded.  Without a separate
    # normalised tile a C=96 CTA needs 72 KiB with 2 weight stages, so 3 CTAs fit an SM.
    _normalise_into(z_smem, zb_smem, z_smem, normalize=normalize, eps=eps)
    zn_smem = z_smem

    def accumulate(acc2_ref):
      if pipelined:
        _pipelined_chunks(acc2_ref, zn_smem, w1t_gmem, b1_gmem, w2_gmem, h_smem, c=c, e=e,
                          hc=hc, act=act, stages=stages)
        return acc2_ref[...]

      def chunk(_, w1t_smem, b1_smem, w2_smem):
        _hidden_chunk(acc2_ref, zn_smem, w1t_smem, b1_smem, w2_smem, h_smem, act=act)

      plgpu.emit_pipeline(
          chunk,
          grid=(e // hc,),
          in_specs=[
              plgpu.BlockSpec((hc, c), lambda j: (j, 0), transforms=_transforms(c, dtype)),
              plgpu.BlockSpec((hc,), lambda j: (j,)),
              plgpu.BlockSpec((hc, c), lambda j: (j, 0), transforms=_transforms(c, dtype)),
          ],
          max_concurrent_steps=stages,
      )(w1t_gmem, b1_gmem, w2_gmem)
      return acc2_ref[...]

    acc = pl.run_scoped(accumulate, plgpu.ACC((bm, c), jnp.float32))

    if has_res:
      plgpu.barrier_wait(bars.at[1])
    plgpu.barrier_wait(bars.at[2])
    plgpu.barrier_wait(bars.at[4])
    _residual_out(acc, b2_smem, rs_smem, res_smem, out_gmem.at[rows], select_zero_rows,
                  has_res=has_res)

  pl.run_scoped(
      scoped,
      plgpu.SMEM((bm, c), dtype, transforms=tile_t),
      plgpu.SMEM((bm, c), dtype, transforms=tile_t),
      plgpu.SMEM((bm,), jnp.float32),
      plgpu.SMEM((c,), jnp.float32),
      plgpu.SMEM((c,), jnp.float32),
      plgpu.Barrier(num_barriers=5),
      plgpu.SMEM((2, bm, hc) if pipelined else (bm, hc), dtype,
                 transforms=_transforms(hc, dtype))
      if h_in_smem else None,
  )


def _warp_roles(compute, memory):
  """The roles of a warp-specialised CTA (``num_threads=3``, thread axis "wg"):
  ``compute(wgi)`` on warpgroups 0 and 1 with 232 registers per thread, ``memory()`` (the
  TMA issuer) on warpgroup 2 with 40 (2 x 128 x 232 + 128 x 40 fits the 64K register
  file)."""
  wgi = lax.axis_index("wg")

  @pl.when(wgi < 2)
  def _():
    plgpu.set_max_registers(232, action="increase")
    compute(wgi)

  @pl.when(wgi == 2)
  def _():
    plgpu.set_max_registers(40, action="decrease")
    memory()


def _kernel_ws(z_gmem, res_gmem, rs_gmem, zb_gmem, w1t_gmem, b1_gmem, w2_gmem, b2_gmem,
               out_gmem, *, c: int, e: int, hc: int, act: str, normalize: bool, eps: float,
               stages: int, h_in_smem: bool, has_res: bool = True,
               select_zero_rows: bool = False):
  """128 rows per CTA, warp-specialised: warpgroups 0 and 1 each own 64 rows and run the
  same LN -> (wgmma, activation, wgmma) per hidden chunk as ``_kernel``; warpgroup 2 only
  issues the TMA copies of the weight chunks into ``stages`` slots, refilling a slot once
  both compute warpgroups have arrived on its "consumed" barrier.  Each weight chunk is
  thus read from L2 once per 128 rows, and while one compute warpgroup evaluates its
  activation the other's wgmma can run (the pattern of jax's Hopper attention kernel)."""
  dtype = z_gmem.dtype
  n_chunks = e // hc
  i = lax.axis_index("m")

  def body(zr_smem, zn_smem, rs_smem, zb_smem, b1_smem, b2_smem, w1t_smem, w2_smem,
           tile_bars, param_bars, w1_bars, w2_bars, consumed, h_smem):
    def _compute(wgi):
      rows = pl.ds(i * 128 + wgi * 64, 64)
      my_z, my_zn, my_rs = zr_smem.at[wgi], zn_smem.at[wgi], rs_smem.at[wgi]
      my_h = None if h_smem is None else h_smem.at[wgi]
      plgpu.copy_gmem_to_smem(z_gmem.at[rows], my_z, tile_bars.at[3 * wgi])
      plgpu.copy_gmem_to_smem(rs_gmem.at[rows], my_rs, tile_bars.at[3 * wgi + 1])
      plgpu.barrier_wait(tile_bars.at[3 * wgi])
      plgpu.barrier_wait(param_bars.at[0])
      _normalise_into(my_z, zb_smem, my_zn, normalize=normalize, eps=eps)
      if has_res:
        plgpu.copy_gmem_to_smem(res_gmem.at[rows], my_z, tile_bars.at[3 * wgi + 2])
      plgpu.barrier_wait(param_bars.at[1])

      def accumulate(acc2_ref):
        @pl.loop(0, n_chunks)
        def _chunk(j):
          slot = lax.rem(j, stages)
          plgpu.barrier_wait(w1_bars.at[slot])

          _hidden_chunk(acc2_ref, my_zn, w1t_smem.at[slot], b1_smem.at[j], w2_smem.at[slot],
                        my_h, act=act,
                        wait_w2=lambda: plgpu.barrier_wait(w2_bars.at[slot]))
          plgpu.barrier_arrive(consumed.at[slot])
        return acc2_ref[...]

      acc = pl.run_scoped(accumulate, plgpu.ACC((64, c), jnp.float32))
      plgpu.barrier_wait(tile_bars.at[3 * wgi + 1])
      if has_res:
        plgpu.barrier_wait(tile_bars.at[3 * wgi + 2])
      plgpu.barrier_wait(param_bars.at[2])
      _residual_out(acc, b2_smem, my_rs, my_z, out_gmem.at[rows], select_zero_rows,
                    has_res=has_res)

    def _memory():
      plgpu.copy_gmem_to_smem(zb_gmem, zb_smem, param_bars.at[0])
      plgpu.copy_gmem_to_smem(b1_gmem, b1_smem, param_bars.at[1])
      plgpu.copy_gmem_to_smem(b2_gmem, b2_smem, param_bars.at[2])

      def issue(j, slot):
        plgpu.copy_gmem_to_smem(w1t_gmem.at[pl.ds(j * hc, hc)], w1t_smem.at[slot],
                                w1_bars.at[slot])
        plgpu.copy_gmem_to_smem(w2_gmem.at[pl.ds(j * hc, hc)], w2_smem.at[slot],
                                w2_bars.at[slot])

      for s in range(min(stages, n_chunks)):
        issue(s, s)
      if n_chunks > stages:
        @pl.loop(0, n_chunks - stages)
        def _refill(j):
          slot = lax.rem(j, stages)
          plgpu.barrier_wait(consumed.at[slot])
          issue(j + stages, slot)
      # Observe the last chunks' "consumed" phases too, so that every barrier phase this
      # warpgroup waits on is drained before the barriers are freed.
      for j in range(max(n_chunks - stages, 0), n_chunks):
        plgpu.barrier_wait(consumed.at[j % stages])

    _warp_roles(_compute, _memory)

  w_t = _transforms(c, dtype)
  pl.run_scoped(
      body,
      plgpu.SMEM((2, 64, c), dtype, transforms=w_t),
      plgpu.SMEM((2, 64, c), dtype, transforms=w_t),
      plgpu.SMEM((2, 64), jnp.float32),
      plgpu.SMEM((c,), jnp.float32),
      plgpu.SMEM((n_chunks, hc), jnp.float32),
      plgpu.SMEM((c,), jnp.float32),
      plgpu.SMEM((stages, hc, c), dtype, transforms=w_t),
      plgpu.SMEM((stages, hc, c), dtype, transforms=w_t),
      plgpu.Barrier(num_barriers=6),
      plgpu.Barrier(num_barriers=3),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.SMEM((2, 64, hc), dtype, transforms=_transforms(hc, dtype))
      if h_in_smem else None,
      collective_axes="wg",
  )


# fused_mlp(resident=None) runs the resident-weight kernel wherever the weights fit.
RESIDENT = True


def resident_smem_bytes(c: int, e: int, n_wg: int, itemsize: int = 2, hc: int = 64,
                        h_in_smem: bool = False) -> int:
  """Shared memory of ``_kernel_resident``: all of W1^T and W2, b1, and per compute
  warpgroup a 64-row z tile, residual tile and row scale (and hidden chunk where
  ``h_in_smem``), zb and b2."""
  per_wg = 2 * 64 * c * itemsize + 64 * 4 + (64 * hc * itemsize if h_in_smem else 0)
  return 2 * e * c * itemsize + e * 4 + n_wg * per_wg + 2 * c * 4


def resident_warpgroups(c: int, e: int, itemsize: int = 2, hc: int = 64,
                        h_in_smem: bool = False, max_wg: int = 3) -> int:
  """Compute warpgroups (3 or 2, at most ``max_wg``) of ``_kernel_resident`` that fit shared
  memory beside the resident weights; 0 where not even 2 do (C=96, E=384: 3; C=128, E=512:
  0)."""
  for n_wg in range(max_wg, 1, -1):
    if resident_smem_bytes(c, e, n_wg, itemsize, hc, h_in_smem) + _SMEM_SLACK <= SMEM_BYTES:
      return n_wg
  return 0


def _kernel_resident(z_gmem, res_gmem, rs_gmem, zb_gmem, w1t_gmem, b1_gmem, w2_gmem, b2_gmem,
                     out_gmem, *, c: int, e: int, hc: int, act: str, normalize: bool,
                     eps: float, n_wg: int, n_ctas: int, n_tiles: int, h_in_smem: bool,
                     has_res: bool = True, select_zero_rows: bool = False):
  """Weights resident in shared memory, persistent CTAs: warpgroup 0 loads all of W1^T, W2
  and the bias vectors once per CTA; then each of the ``n_wg`` compute warpgroups walks its
  own 64-row tiles (tile g, g + stride, ... for g = cta n_wg + wg, stride = n_ctas n_wg),
  each as ``_kernel``'s 64-row CTA does: load z / residual / row scale, (LayerNorm in
  place,) every hidden chunk's wgmma -> activation -> wgmma against the resident weights,
  then the residual epilogue and its TMA store.  Why: with 64-row CTAs each CTA streams all
  of W1 and W2 from L2 (147 KB at C=96, E=384) for 24 KB of rows; here they are read once
  per SM, and the warpgroups' tiles interleave on the tensor cores.  For small C only (C=96,
  E=384: 144 KB of weights, 3 compute warpgroups)."""
  dtype = z_gmem.dtype
  n_chunks = e // hc
  cta = lax.axis_index("m")
  stride = n_ctas * n_wg
  per_wg = -(-n_tiles // stride)

  def body(z_smem, res_smem, rs_smem, w1t_smem, w2_smem, b1_smem, zb_smem, b2_smem,
           w_bars, p_bars, tile_bars, h_smem):
    wgi = lax.axis_index("wg")

    @pl.when(wgi == 0)
    def _():
      for j in range(n_chunks):
        plgpu.copy_gmem_to_smem(w1t_gmem.at[pl.ds(j * hc, hc)], w1t_smem.at[j],
                                w_bars.at[2 * j])
        plgpu.copy_gmem_to_smem(w2_gmem.at[pl.ds(j * hc, hc)], w2_smem.at[j],
                                w_bars.at[2 * j + 1])
      plgpu.copy_gmem_to_smem(b1_gmem, b1_smem, p_bars.at[0])
      plgpu.copy_gmem_to_smem(zb_gmem, zb_smem, p_bars.at[1])
      plgpu.copy_gmem_to_smem(b2_gmem, b2_smem, p_bars.at[2])

    for i in range(2 * n_chunks):
      plgpu.barrier_wait(w_bars.at[i])
    for i in range(3):
      plgpu.barrier_wait(p_bars.at[i])
    my_z, my_res, my_rs = z_smem.at[wgi], res_smem.at[wgi], rs_smem.at[wgi]
    my_h = None if h_smem is None else h_smem.at[wgi]
    first = cta * n_wg + wgi

    @pl.loop(0, per_wg)
    def _tile(k):
      t = first + k * stride

      @pl.when(t < n_tiles)
      def _():
        rows = pl.ds(t * 64, 64)
        plgpu.copy_gmem_to_smem(z_gmem.at[rows], my_z, tile_bars.at[3 * wgi])
        if has_res:
          plgpu.copy_gmem_to_smem(res_gmem.at[rows], my_res, tile_bars.at[3 * wgi + 1])
        plgpu.copy_gmem_to_smem(rs_gmem.at[rows], my_rs, tile_bars.at[3 * wgi + 2])
        plgpu.barrier_wait(tile_bars.at[3 * wgi])
        _normalise_into(my_z, zb_smem, my_z, normalize=normalize, eps=eps)

        def accumulate(acc2_ref):
          for j in range(n_chunks):
            _hidden_chunk(acc2_ref, my_z, w1t_smem.at[j], b1_smem.at[j], w2_smem.at[j],
                          my_h, act=act)
          return acc2_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((64, c), jnp.float32))
        if has_res:
          plgpu.barrier_wait(tile_bars.at[3 * wgi + 1])
        plgpu.barrier_wait(tile_bars.at[3 * wgi + 2])
        # (the epilogue waits for its TMA store, so the next tile's loads find the tiles free)
        _residual_out(acc, b2_smem, my_rs, my_res, out_gmem.at[rows], select_zero_rows,
                      has_res=has_res)

  t = _transforms(c, dtype)
  pl.run_scoped(
      body,
      plgpu.SMEM((n_wg, 64, c), dtype, transforms=t),
      plgpu.SMEM((n_wg, 64, c), dtype, transforms=t),
      plgpu.SMEM((n_wg, 64), jnp.float32),
      plgpu.SMEM((n_chunks, hc, c), dtype, transforms=t),
      plgpu.SMEM((n_chunks, hc, c), dtype, transforms=t),
      plgpu.SMEM((n_chunks, hc), jnp.float32),
      plgpu.SMEM((c,), jnp.float32),
      plgpu.SMEM((c,), jnp.float32),
      plgpu.Barrier(num_barriers=2 * n_chunks),
      plgpu.Barrier(num_barriers=3),
      plgpu.Barrier(num_barriers=3 * n_wg),
      plgpu.SMEM((n_wg, 64, hc), dtype, transforms=_transforms(hc, dtype))
      if h_in_smem else None,
      collective_axes="wg",
  )


def _sm_count() -> int:
  """Streaming multiprocessors of the first device (132 on an H100 SXM; 132 without a GPU,
  e.g. in the interpreter)."""
  try:
    return int(getattr(jax.devices()[0], "core_count", 0)) or 132
  except Exception:  # pragma: no cover
    return 132


def check_mlp_args(z, res, w1, b1, w2, b2) -> tuple[int, int, int]:
  """(M, C, E) of a ``fused_mlp``-style call, after checking the shapes fit together."""
  m, c = z.shape
  e = w1.shape[1]
  if res is not None and (res.shape != z.shape or res.dtype != z.dtype):
    raise ValueError(f"res must match z: got {res.shape} {res.dtype} vs {z.shape} {z.dtype}")
  if w1.shape != (c, e) or w2.shape != (e, c) or b1.shape != (e,) or b2.shape != (c,):
    raise ValueError(f"weight shapes do not fit C={c}, E={e}: w1 {w1.shape}, b1 {b1.shape}, "
                     f"w2 {w2.shape}, b2 {b2.shape}")
  return m, c, e


def row_inputs(z, res, z_bias, row_scale, block_m: int):
  """(z, res, zb, rs): the optional vectors as float32 (zeros / ones when None), the rows
  zero-padded to a multiple of ``block_m`` (the last CTA's rows; callers slice them off).
  res None stays None."""
  m, c = z.shape
  zb = jnp.zeros((c,), jnp.float32) if z_bias is None else z_bias.astype(jnp.float32)
  rs = jnp.ones((m,), jnp.float32) if row_scale is None else row_scale.astype(jnp.float32)
  m_pad = -(-m // block_m) * block_m
  if m_pad != m:
    z = jnp.pad(z, ((0, m_pad - m), (0, 0)))
    res = None if res is None else jnp.pad(res, ((0, m_pad - m), (0, 0)))
    rs = jnp.pad(rs, (0, m_pad - m))
  return z, res, zb, rs


@_switches.jit(static_argnames=("act", "normalize", "eps", "hidden_chunk",
                                "stages", "h_in_smem", "block_m", "pipelined",
                                "select_zero_rows", "resident",
                                "interpret"))
def fused_mlp(z, res, w1, b1, w2, b2, *, z_bias=None, row_scale=None, act: str = "gelu",
              normalize: bool = True, eps: float = 1e-6, hidden_chunk: int = 64,
              stages: int = 2, h_in_smem: bool | None = None, block_m: int = BLOCK_M,
              pipelined: bool = False, select_zero_rows: bool = False,
              resident: bool | None = None, interpret: bool = False):
  """y = res + row_scale * (act(norm(z + z_bias) @ w1 + b1) @ w2 + b2) over rows.

  z, res: (M, C) bfloat16/float16 (y has their dtype); res may be None (no residual: the
  kernel reads none); w1: (C, E); w2: (E, C); b1: (E,);
  b2, z_bias: (C,); row_scale: (M,) or None (ones).  Weights are cast to z's dtype, biases
  and scales used in float32; accumulation is float32.  Raises NotImplementedError naming
  the reason for shapes/dtypes the kernel does not support (see ``unsupported_reason``).

  block_m: rows per CTA: 64 (one warpgroup, ``_kernel``) or 128 (two compute warpgroups of
  64 rows sharing each weight chunk, fed by a third TMA warpgroup: ``_kernel_ws``).
  h_in_smem: pass the activated hidden chunk to the second wgmma through shared memory
  (True) or as its register operand (False).  None = registers on a GPU, shared memory in
  the interpreter, which does not model register operands of wgmma.
  pipelined: (block_m=64 only; needs stages >= 2) keep the next hidden chunk's first wgmma
  in flight while the current chunk's activation runs (``_pipelined_chunks``).  Compiled
  and correct on an H100 but slower than the serial loop (batch 128, 2026-11-26,
  benchmarks.mosaic_pipelined): ConvNeXt 56x56x96 0.387-0.402 vs 0.277 ms, 28x28x192 (64-row
  CTAs) 0.229 vs 0.177 (128-row serial), ConvFirst E4 / E6 0.141 / 0.244 vs 0.113 / 0.182 --
  the second accumulator's registers cost more than the overlap gains; off by default.
  select_zero_rows: rows whose row_scale is 0 get exactly res, even where the branch is not
  finite there (the padded-row layout's border rows, ``convfirst_block.mosaic_gconv``).
  resident: the weights stay in shared memory and persistent CTAs of 2-3 compute
  warpgroups walk 64-row tiles (``_kernel_resident``; small C only, see
  ``resident_warpgroups``; block_m, stages and pipelined do not apply).  None: wherever
  the weights fit (``RESIDENT``), unless block_m=128 or pipelined ask for another kernel.
  H100, 2026-11-27, C=96, E=384, batch 128 (401,408 rows): LayerNorm + GELU 0.255-0.259 vs
  0.279-0.283 ms, SiLU 0.206-0.208 vs 0.252-0.253 (batch 256: 0.462-0.467 vs 0.523-0.528,
  0.389-0.390 vs 0.457-0.462)."""
  m, c, e = check_mlp_args(z, res, w1, b1, w2, b2)
  reason = unsupported_reason(m, c, e, z.dtype, hidden_chunk)
  if reason is not None:
    raise NotImplementedError(f"fused_mlp: {reason}")
  dtype = z.dtype
  if block_m not in (64, 128):
    raise ValueError(f"block_m must be 64 or 128, got {block_m}")
  if pipelined and (block_m != 64 or stages < 2 or e % (2 * hidden_chunk)):
    raise ValueError(f"pipelined=True needs block_m=64, stages >= 2 (the weight slots are "
                     f"released one step late) and an even number of hidden chunks, got "
                     f"block_m={block_m}, stages={stages}, E={e}, hidden_chunk={hidden_chunk}")
  if pipelined and (need := pipelined_smem_bytes(c, hidden_chunk, stages,
                                                 jnp.dtype(dtype).itemsize)) > SMEM_BYTES:
    raise NotImplementedError(
        f"fused_mlp(pipelined=True): C={c} with hidden_chunk={hidden_chunk} and stages={stages} "
        f"needs ~{need:,} bytes of shared memory, more than the {SMEM_BYTES:,} a CTA can "
        f"have; use fewer stages or the serial kernel (pipelined=False)")
  interpreting = interpret is not False and interpret is not None
  if h_in_smem is None:
    h_in_smem = interpreting
  # (Compiled only: the interpreter models no shared-memory limit.)
  if resident and pipelined:
    raise ValueError("resident=True and pipelined=True are two different kernels: pick one")
  if resident is None:
    resident = (RESIDENT and block_m == 64 and not pipelined and resident_warpgroups(
        c, e, jnp.dtype(dtype).itemsize, hidden_chunk,
        interpreting if h_in_smem is None else bool(h_in_smem)) > 0)
  if not pipelined and not resident and not interpreting and (need := fused_smem_bytes(
      c, e, hidden_chunk, stages, block_m, jnp.dtype(dtype).itemsize,
      bool(h_in_smem))) + _SMEM_SLACK > SMEM_BYTES:
    raise NotImplementedError(
        f"fused_mlp: C={c}, E={e} with block_m={block_m}, hidden_chunk={hidden_chunk} and "
        f"stages={stages} needs ~{need:,} bytes of shared memory, more than the "
        f"{SMEM_BYTES:,} a CTA can have; use fewer stages or block_m=64")
  z, res, zb, rs = row_inputs(z, res, z_bias, row_scale, block_m)
  m_pad = z.shape[0]
  if interpreting and not h_in_smem:
    raise ValueError("h_in_smem=False (wgmma with a register operand) is not modelled by "
                     "the Mosaic GPU interpreter; use h_in_smem=True or None")
  common = dict(c=c, e=e, hc=hidden_chunk, act=act, normalize=normalize, eps=float(eps),
                stages=stages, h_in_smem=bool(h_in_smem), has_res=res is not None,
                select_zero_rows=select_zero_rows)
  if res is None:  # the kernel's res operand is never read: any (M, C) array will do
    res = z
  grid = (m_pad // block_m,)
  if resident:
    n_wg = resident_warpgroups(c, e, jnp.dtype(dtype).itemsize, hidden_chunk,
                               bool(h_in_smem))
    if not n_wg:
      raise NotImplementedError(
          f"fused_mlp(resident=True): C={c}, E={e} weights "
          f"({2 * c * e * jnp.dtype(dtype).itemsize:,} bytes) leave no room for two 64-row "
          f"tiles in the {SMEM_BYTES:,} bytes of shared memory a CTA can have")
    if interpreting:
      # The interpreter runs each warpgroup's code as an XLA:CPU computation; warpgroups
      # blocked on the weights' barrier held the XLA:CPU threads of a 2-core machine while
      # warpgroup 0, which issues those loads, waited for one: a hang in 1 of 3 standalone
      # runs with 3 compute warpgroups, and in CI (inside a model's forward) with 2
      # (2026-11-27).  So it interprets one compute warpgroup per CTA, which waits only on
      # loads it issued itself; the multi-warpgroup form is checked by CUDA lowering on a
      # CPU and by the GPU tests.
      n_wg = 1
    n_tiles = m_pad // 64
    n_ctas = max(1, min(_sm_count(), -(-n_tiles // n_wg)))
    kernel = functools.partial(_kernel_resident, n_wg=n_wg, n_ctas=n_ctas, n_tiles=n_tiles,
                               **{k: v for k, v in common.items() if k != "stages"})
    threads = dict(num_threads=n_wg, thread_name="wg")
    b1 = b1.reshape(e // hidden_chunk, hidden_chunk)
    grid = (n_ctas,)
  elif block_m == 128:  # two compute warpgroups + one TMA warpgroup
    kernel = functools.partial(_kernel_ws, **common)
    threads = dict(num_threads=3, thread_name="wg")
    b1 = b1.reshape(e // hidden_chunk, hidden_chunk)
  else:
    kernel = functools.partial(_kernel, bm=block_m, pipelined=pipelined, **common)
    threads = {}
  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m_pad, c), dtype),
      grid=grid,
      grid_names=("m",),
      **threads,
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret),
  )
  y = call(z, res, rs, zb, w1.T.astype(dtype), b1.astype(jnp.float32), w2.astype(dtype),
           b2.astype(jnp.float32))
  return y[:m] if m_pad != m else y


def _interpret_params(interpret):
  """None (compile for the GPU), or the Mosaic GPU interpreter's parameters: ``True`` =
  defaults (buffers start as NaN, so unwritten output rows show up), or an
  ``plgpu.InterpretGPUParams`` instance (e.g. with ``detect_races=True``)."""
  if not interpret:
    return None
  _warn_if_async_cpu_dispatch()
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  return plgpu.InterpretGPUParams()


_ASYNC_WARNED = False


def _warn_if_async_cpu_dispatch():
  """The interpreter runs a kernel's warpgroups as host threads that start computations of
  their own from inside the running kernel.  With XLA:CPU's asynchronous dispatch (jax's
  default) the caller goes on dispatching while a kernel runs, and the two can deadlock:
  seen with jax 0.11.2 on a 2-core machine, a 3-warpgroup kernel (block_m=128) under
  ``jax.vjp`` followed by eager jnp ops hung at the first or second call in each of three
  tries (one a full test-suite run); with ``jax_cpu_enable_async_dispatch=False`` 40 calls
  in a row ran.  tests/conftest.py sets it;
  elsewhere this warns once."""
  global _ASYNC_WARNED
  if _ASYNC_WARNED:
    return
  try:
    async_dispatch = bool(jax.config.read("jax_cpu_enable_async_dispatch"))
  except (AttributeError, KeyError):  # the option's name or the config API changed
    return
  if async_dispatch and jax.default_backend() == "cpu":
    _ASYNC_WARNED = True
    warnings.warn(
        "Mosaic GPU interpreter on XLA:CPU with asynchronous dispatch: multi-warpgroup "
        "kernels can deadlock against computations dispatched while they run.  Set "
        "jax.config.update('jax_cpu_enable_async_dispatch', False) before jax's first "
        "computation (tests/conftest.py does).", RuntimeWarning, stacklevel=3)


def expand_reference(z, w1, b1, *, z_bias=None, act: str = "gelu", normalize: bool = True,
                     eps: float = 1e-6, bias_row_mask=None):
  """act(norm(z + z_bias) @ w1 + b1) in float32 jnp (the first half of
  ``fused_mlp_reference``; with ``bias_row_mask`` (M,) the bias is scaled per row, as the
  MBConv expand kernels do).  The matmul at HIGHEST precision (not tf32 on a GPU)."""
  f32 = jnp.float32
  z = z.astype(f32) + (0.0 if z_bias is None else z_bias.astype(f32))
  if normalize:
    mean = z.mean(-1, keepdims=True)
    var = jnp.square(z - mean).mean(-1, keepdims=True)
    z = (z - mean) * lax.rsqrt(var + eps)
  b1 = b1.astype(f32)
  if bias_row_mask is not None:
    b1 = bias_row_mask.astype(f32)[:, None] * b1
  h = jnp.dot(z, w1.astype(f32), precision=lax.Precision.HIGHEST) + b1
  if act == "gelu":
    return jax.nn.gelu(h, approximate=False)
  if act == "gelu_tanh":
    return jax.nn.gelu(h, approximate=True)
  if act == "silu":
    return jax.nn.silu(h)
  if act == "identity":
    return h
  raise ValueError(f"activation must be one of {ACTIVATIONS}, got {act!r}")


def fused_mlp_reference(z, res, w1, b1, w2, b2, *, z_bias=None, row_scale=None,
                        act: str = "gelu", normalize: bool = True, eps: float = 1e-6):
  """The same function in float32 jnp (the kernel's definition)."""
  f32 = jnp.float32
  h = expand_reference(z, w1, b1, z_bias=z_bias, act=act, normalize=normalize, eps=eps)
  out = h @ w2.astype(f32) + b2.astype(f32)
  if row_scale is not None:
    out = out * row_scale.astype(f32)[:, None]
  if res is None:
    return out
  return (res.astype(f32) + out).astype(res.dtype)
