"""pallas_kernels.batchnorm: BatchNorm (+ SiLU) with batch statistics, its per-channel
reductions as Pallas-Triton kernels (interpret mode here; compiled in the gpu-marked test)
vs plain jnp BatchNorm and jax.grad of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import batchnorm as bn
from tests import rand


def reference(z, scale, bias, eps=1e-5, act=None):
  """flax's BatchNorm with batch statistics (float32, one-pass variance), then act."""
  zf = z.astype(jnp.float32)
  mean = zf.mean(0)
  var = jnp.maximum(0.0, jnp.square(zf).mean(0) - jnp.square(mean))
  y = (zf - mean) * jax.lax.rsqrt(var + eps) * scale + bias
  return (jax.nn.silu(y) if act else y).astype(z.dtype), mean, var


def _inputs(m, c, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  z = (rand.normal(k[0], (m, c)) * 2 + 0.7).astype(dtype)
  scale = 1 + 0.3 * rand.normal(k[1], (c,))
  bias = 0.2 * rand.normal(k[2], (c,))
  cot = rand.normal(k[3], (m, c))
  # Cotangents of the statistics too (zero in training; the VJP must still be exact).
  cot_stats = rand.normal(k[4], (2, c))
  return z, scale, bias, cot, cot_stats


def _loss(fn, cot, cot_stats):
  def loss(z, s, b):
    y, mean, var = fn(z, s, b)
    return (jnp.vdot(y.astype(jnp.float32), cot) + jnp.vdot(mean, cot_stats[0])
            + jnp.vdot(var, cot_stats[1]))
  return loss


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# Rows: fewer than one tile, not a multiple of a tile, several programs; channel counts of
# ConvFirstNet's BatchNorms (stem / stage widths, 4x expansions) incl. one with a small
# power-of-two factor (40 = 5 x 8).
@pytest.mark.parametrize("m,c", [(7, 24), (301, 96), (1000, 40), (97, 1536), (520, 256)])
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
def test_forward_and_gradients_match_reference(m, c, act, dtype, tol):
  z, scale, bias, cot, cot_stats = _inputs(m, c, dtype)
  f = lambda z, s, b: bn.batch_norm_act(z, s, b, act=act, implementation="pallas",
                                        interpret=True)
  g = lambda z, s, b: reference(z, s, b, act=act)
  out, ref = f(z, scale, bias), g(z, scale, bias)
  assert out[0].dtype == dtype and out[0].shape == (m, c)
  assert out[1].dtype == out[2].dtype == jnp.float32
  assert _rel(out[0], ref[0]) < tol
  # Statistics against float64 numpy on the same (rounded) inputs.
  z64 = np.asarray(z, np.float64)
  assert _rel(out[1], z64.mean(0)) < 1e-6 and _rel(out[2], z64.var(0)) < 1e-5
  grads = jax.grad(_loss(f, cot, cot_stats), (0, 1, 2))(z, scale, bias)
  grads_ref = jax.grad(_loss(g, cot, cot_stats), (0, 1, 2))(z, scale, bias)
  for a, b in zip(grads, grads_ref):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert _rel(a, b) < (tol if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize("tiles", [bn.Tiles(16, 1), bn.Tiles(16, 3), bn.Tiles(64, 2, 8, 2)])
def test_tilings_cover_every_row(tiles):
  # Several row programs, a partial last program and a partial last tile in it.
  z, scale, bias, cot, _ = _inputs(203, 64, jnp.float32, seed=1)
  s1, s2 = bn.column_sums(z, tiles=tiles, interpret=True)
  z64 = np.asarray(z, np.float64)
  assert _rel(s1, z64.sum(0)) < 1e-6 and _rel(s2, np.square(z64).sum(0)) < 1e-6
  mean, var = z.mean(0), z.var(0)
  rstd = jax.lax.rsqrt(var + 1e-5)
  got = bn._bwd_sums(z, cot, mean, rstd, scale, bias, "silu", 1, True, tiles)
  want = bn._xla_bwd_sums(z, cot, mean, rstd, scale, bias, "silu")
  for a, b in zip(got, want):
    assert _rel(a, b) < 1e-6


def test_xla_implementation_is_the_same_function():
  z, scale, bias, cot, cot_stats = _inputs(300, 48, jnp.float32, seed=2)
  for act in (None, "silu"):
    f = lambda z, s, b: bn.batch_norm_act(z, s, b, act=act, implementation="xla")
    g = lambda z, s, b: reference(z, s, b, act=act)
    for a, b in zip(f(z, scale, bias), g(z, scale, bias)):
      assert _rel(a, b) < 1e-6
    for a, b in zip(jax.grad(_loss(f, cot, cot_stats), (0, 1, 2))(z, scale, bias),
                    jax.grad(_loss(g, cot, cot_stats), (0, 1, 2))(z, scale, bias)):
      assert _rel(a, b) < 1e-5


def test_none_keeps_xla_off_gpu():
  z, scale, bias, _, _ = _inputs(8192, 16, jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda z: bn.batch_norm_act(z, scale, bias))(z))
  assert ("pallas_call" in jaxpr) == (jax.default_backend() == "gpu")
  # In the interpreter, None picks the kernels from MIN_ROWS rows up.
  picks = lambda m: "pallas_call" in str(jax.make_jaxpr(
      lambda z: bn.batch_norm_act(z, scale, bias, interpret=True))(z[:m]))
  assert picks(bn.MIN_ROWS) and not picks(bn.MIN_ROWS - 1)


def test_bad_input_is_named():
  z, scale, bias, _, _ = _inputs(10, 16, jnp.float32)
  with pytest.raises(ValueError, match="act must be one of"):
    bn.batch_norm_act(z, scale, bias, act="gelu")
  with pytest.raises(ValueError, match="implementation must be"):
    bn.batch_norm_act(z, scale, bias, implementation="triton")
  with pytest.raises(ValueError, match=r"\(rows, channels\)"):
    bn.batch_norm_act(z.reshape(2, 5, 16), scale, bias)
  with pytest.raises(ValueError, match=r"scale and bias must be \(16,\)"):
    bn.batch_norm_act(z, scale[:8], bias)
  with pytest.raises(ValueError, match="at least one row"):
    bn.batch_norm_act(z[:0], scale, bias, implementation="pallas", interpret=True)
  with pytest.raises(ValueError, match="float32/bfloat16/float16"):
    bn.batch_norm_act(z.astype(jnp.int32), scale, bias, implementation="pallas",
                      interpret=True)
  if jax.default_backend() != "gpu":
    with pytest.raises(NotImplementedError, match="need a GPU backend.*'cpu'"):
      bn.batch_norm_act(z, scale, bias, implementation="pallas")


@pytest.mark.gpu
@pytest.mark.parametrize("m,c", [(25088, 1024), (401408, 96), (6272, 3072), (999, 40)])
def test_compiled_kernels_match_xla(m, c):
  z, scale, bias, cot, cot_stats = _inputs(m, c, jnp.bfloat16, seed=3)
  for act in (None, "silu"):
    f = jax.jit(jax.value_and_grad(_loss(
        lambda z, s, b: bn.batch_norm_act(z, s, b, act=act, implementation="pallas"),
        cot, cot_stats), (0, 1, 2)))
    g = jax.jit(jax.value_and_grad(_loss(
        lambda z, s, b: reference(z.astype(jnp.float32), s, b, act=act), cot, cot_stats),
        (0, 1, 2)))
    (v, grads), (v_ref, grads_ref) = f(z, scale, bias), g(z, scale, bias)
    assert abs(float(v) - float(v_ref)) <= 1e-2 * abs(float(v_ref)) + 1e-2
    for a, b in zip(grads, grads_ref):
      assert _rel(a, b) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [True, False])
def test_compiled_float32_sums_are_tight(fast):
  # The compiled backward sums (SiLU derivative with the PTX ex2/rcp approximations when
  # fast) against float64 sums of the exact expression; the interpreter never runs the
  # approximations, so this is their only check.
  z, scale, bias, cot, _ = _inputs(25088, 256, jnp.float32, seed=4)
  mean, var = z.mean(0), z.var(0)
  rstd = jax.lax.rsqrt(var + 1e-5)
  tiles = bn.Tiles(fast_sigmoid=fast)
  got = jax.jit(lambda *a: bn._bwd_sums(*a, "silu", 1, False, tiles))(
      z, cot, mean, rstd, scale, bias)
  z64, cot64 = np.asarray(z, np.float64), np.asarray(cot, np.float64)
  zhat = (z64 - np.asarray(mean, np.float64)) * np.asarray(rstd, np.float64)
  v = zhat * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)
  sig = 1 / (1 + np.exp(-v))
  dv = cot64 * sig * (1 + v * (1 - sig))
  for a, b in zip(got, (dv.sum(0), (dv * zhat).sum(0))):
    assert _rel(a, b) < 1e-5
