"""Depthwise conv with alternative weight-gradient formulations (pallas_kernels.convnext_block
.dwconv) against plain autodiff of XLA's depthwise conv: value, input gradient, kernel
gradient, for every formulation, float32 (tight) and bfloat16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import convnext_block_reference
from pallas_kernels.convnext_block import dwconv, tuning
from tests import rand


def _plain_autodiff(x, w, g):
  y, vjp = jax.vjp(lambda a, b: dwconv.depthwise_conv(a, b, wgrad="xla"), x, w)
  return (y, *vjp(g))


def _rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32))
  b = np.asarray(jnp.asarray(b, jnp.float32))
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape,k", [
    ((2, 7, 7, 64), 7),    # ConvNeXt's last stage
    ((1, 5, 3, 40), 7),    # odd sides smaller than the kernel, batch 1 (g > 8: falls back)
    ((2, 3, 3, 96), 3),    # k = 3
    ((2, 9, 11, 48), 7),   # larger than the kernel
])
@pytest.mark.parametrize("method", ["grouped8", "grouped16", "grouped32", "grouped64"])
def test_matches_autodiff(shape, k, method, dtype, tol):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = rand.normal(kx, shape, dtype)
  w = rand.normal(kw, (k, k, shape[-1]), jnp.float32) * 0.2
  g = rand.normal(kg, shape, dtype)
  want = _plain_autodiff(x, w, g)
  f = jax.jit(lambda a, b, c: (lambda y, vjp: (y, *vjp(c)))(
      *jax.vjp(lambda a_, b_: dwconv.depthwise_conv(a_, b_, wgrad=method), a, b)))
  got = f(x, w, g)
  for name, a, b in zip(("y", "dx", "dw"), got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    assert np.isfinite(np.asarray(a, np.float32)).all(), name
    assert _rel(a, b) < tol, (name, _rel(a, b))


def test_resolve_rule():
  r = lambda shape, k, wgrad="auto": dwconv.resolve_wgrad(shape, k, wgrad, backend="gpu")
  assert r((256, 7, 7, 768), 7) == "grouped64"
  assert r((8, 7, 7, 320), 7) == "grouped64"
  assert r((8, 7, 7, 40), 7) == "grouped8"
  assert r((8, 7, 5, 96), 7) == "grouped32"
  assert r((8, 14, 14, 384), 7) == "xla"
  assert r((8, 8, 7, 768), 7) == "xla"
  assert r((8, 7, 7, 36), 7) == "xla"          # no group width divides C
  assert r((8, 7, 7, 96), 7, "grouped64") == "xla"
  assert r((8, 56, 56, 96), 7, "grouped16") == "grouped16"
  with pytest.raises(ValueError, match="wgrad must be one of"):
    r((8, 7, 7, 64), 7, "grouped4")
  # "auto" takes the grouped form only on GPU (measured there; slower on XLA:CPU).
  assert dwconv.resolve_wgrad((256, 7, 7, 768), 7, "auto", backend="cpu") == "xla"
  assert dwconv.resolve_wgrad((256, 7, 7, 768), 7, "grouped64", backend="cpu") == "grouped64"


def test_bad_kernel_shape():
  x = jnp.zeros((1, 7, 7, 16))
  with pytest.raises(ValueError, match=r"kernel must be \(k, k, 16\)"):
    dwconv.depthwise_conv(x, jnp.zeros((7, 7, 1, 16)))
  with pytest.raises(ValueError, match="rank 4"):
    dwconv.depthwise_conv(x[0], jnp.zeros((7, 7, 16)))


def test_block_reference_gradients_independent_of_wgrad():
  """The XLA ConvNeXt block at a 7x7 image with the grouped weight-gradient formulation
  ("auto" picks it there on a GPU) has the same value and gradients for x and every
  parameter as with XLA's wgrad."""
  kx, kp, kg = jax.random.split(jax.random.key(1), 3)
  x = rand.normal(kx, (2, 7, 7, 64), jnp.float32)
  params = tuning.reference_params(kp, 64)
  g = rand.normal(kg, x.shape, jnp.float32)
  out = {}
  for m in ("xla", "grouped64"):
    y, vjp = jax.vjp(lambda a, p: convnext_block_reference(a, p, dw_wgrad=m), x, params)
    out[m] = (y, *vjp(g))
  flat_x = jax.tree.leaves(out["xla"])
  flat_a = jax.tree.leaves(out["grouped64"])
  assert len(flat_x) == len(flat_a) == 2 + len(params)
  for a, b in zip(flat_a, flat_x):
    assert _rel(a, b) < 2e-6


@pytest.mark.parametrize("shape,k,tiles", [
    ((2, 9, 7, 40), 7, dict(strip=4, cblock=16)),      # C not a block multiple, 3 strips
    ((1, 10, 9, 32), 7, {}),                           # default tiles: one strip of 10
    ((1, 5, 6, 64), 3, dict(strip=2, tile_w=4)),       # W split in tiles, k = 3
    # the column walk: a partial channel block (40 of 64), 2 strips per program past H;
    # default (one 7-row strip per program, a partial last one); unrolled past W, k = 3
    ((2, 9, 7, 40), 7, dict(columns=True, strip=4, rows=8)),
    ((1, 10, 9, 32), 7, dict(columns=True)),
    ((1, 5, 6, 64), 3, dict(columns=True, strip=2, unroll=4)),
    # loads not issued ahead (the default prefetches): unrolled past W, partial strip
    ((2, 9, 7, 40), 7, dict(columns=True, strip=4, rows=8, unroll=2, prefetch=False)),
])
def test_pallas_depthwise_conv_matches_xla(shape, k, tiles):
  """dwconv_triton (the Pallas-Triton depthwise conv, interpreter): strips that do not
  divide H (halo rows from the neighbouring strips), column tiles, channel padding, bias."""
  from pallas_kernels.convnext_block import dwconv_triton
  kx, kk, kb = jax.random.split(jax.random.key(shape[-1] + k), 3)
  x = rand.normal(kx, shape)
  kernel = rand.normal(kk, (k, k, shape[-1]))
  bias = rand.normal(kb, (shape[-1],))
  got = dwconv_triton.depthwise_conv(x, kernel, bias, interpret=True,
                                     tiles=dwconv_triton.DwconvTiles(**tiles))
  want = dwconv._plain(x, kernel) + bias
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="kernel must be"):
    dwconv_triton.depthwise_conv(x, kernel[:, :, :1], interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 56, 56, 96), (2, 28, 28, 192), (2, 14, 14, 384),
                                   (3, 7, 7, 768), (1, 9, 70, 40)])
def test_pallas_depthwise_conv_compiled_on_gpu(shape):
  """The compiled kernel with its default tiles, and the column walk, at ConvNeXt-T's stage
  shapes and an odd one (W > 64: two column tiles; C=40: a partial channel block), bf16, vs
  XLA in float32."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  from pallas_kernels.convnext_block import dwconv_triton
  kx, kk, kb = jax.random.split(jax.random.key(shape[-1]), 3)
  x = rand.normal(kx, shape).astype(jnp.bfloat16)
  kernel = rand.normal(kk, (7, 7, shape[-1])) * 0.1
  bias = rand.normal(kb, (shape[-1],))
  want = dwconv._plain(x.astype(jnp.float32), kernel) + bias
  for tiles in (None, dwconv_triton.DwconvTiles(columns=True)):  # the tile kernel, the walk
    got = dwconv_triton.depthwise_conv(x, kernel, bias, tiles=tiles)
    err = float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())
    assert err < 1e-2, (tiles, err)


@pytest.mark.parametrize("shape,k,tiles", [
    ((2, 9, 13, 40), 7, {}),                              # odd H/W, C not a block multiple
    ((1, 7, 7, 64), 7, {}),                               # ConvNeXt's last stage: H = W = k
    ((2, 5, 11, 32), 7, dict(strip=2, tile_w=4, cblock=16)),  # 3 strips, 3 column tiles
    ((1, 6, 5, 24), 3, dict(strip=4)),                    # k = 3, a strip not dividing H
    ((2, 9, 13, 40), 7, dict(one_pass=True)),             # the one-pass kernel, same edges
    ((1, 7, 7, 64), 7, dict(one_pass=True)),
    ((2, 5, 11, 32), 7, dict(one_pass=True, strip=2, tile_w=4, cblock=16)),
    ((1, 6, 5, 24), 3, dict(one_pass=True, strip=4)),
    # several images per program, one program's last image past the batch (3 = 2 + 1)
    ((3, 5, 11, 32), 7, dict(one_pass=True, images=2, strip=2, tile_w=4, cblock=16)),
    ((4, 6, 5, 24), 3, dict(one_pass=True, images=4)),
    # the column walk: default tiles (2 strips of 7 rows per program, 64-channel block
    # with C = 40 padded); 7x7; a strip not dividing H, a program past the last row, the
    # unrolled column loop past the last column (11 = 3 + 3 + 3 + 2); k = 3
    ((2, 9, 13, 40), 7, dict(columns=True)),
    ((1, 7, 7, 64), 7, dict(columns=True)),
    ((2, 5, 11, 32), 7, dict(columns=True, strip=2, rows=4, unroll=3)),
    ((1, 6, 5, 24), 3, dict(columns=True, strip=4, rows=4)),
    # the loads not issued one column ahead (the default prefetches)
    ((2, 9, 13, 40), 7, dict(columns=True, prefetch=False)),
    ((2, 5, 11, 32), 7, dict(columns=True, strip=2, rows=4, unroll=3, prefetch=False)),
])
def test_pallas_kernel_gradient_matches_xla(shape, k, tiles):
  """dwconv_triton.depthwise_conv_wgrad (interpreter) vs XLA's autodiff kernel gradient in
  float32: halo rows across strips, column tiles with their halo, channel padding; bf16."""
  from pallas_kernels.convnext_block import dwconv_triton
  kx, kw, kg = jax.random.split(jax.random.key(sum(shape) + k), 3)
  x = rand.normal(kx, shape)
  w = rand.normal(kw, (k, k, shape[-1]))
  g = rand.normal(kg, shape)
  want = _plain_autodiff(x, w, g)[2]
  got = dwconv_triton.depthwise_conv_wgrad(x, g, k, interpret=True,
                                           tiles=dwconv_triton.WgradTiles(**tiles))
  assert got.shape == want.shape and got.dtype == jnp.float32
  assert _rel(got, want) < 2e-6
  if set(tiles) <= {"one_pass", "columns", "prefetch"}:  # bf16, each kernel's default tiles
    xb, gb = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
    got = dwconv_triton.depthwise_conv_wgrad(
        xb, gb, k, interpret=True, tiles=dwconv_triton.WgradTiles(**tiles))
    want = _plain_autodiff(xb.astype(jnp.float32), w, gb.astype(jnp.float32))[2]
    assert _rel(got, want) < 1e-5  # float32 accumulation of the same bf16 inputs
  with pytest.raises(ValueError, match="dy must have x's shape"):
    dwconv_triton.depthwise_conv_wgrad(x, g[:, :1], k, interpret=True)
  with pytest.raises(ValueError, match="even kernel size"):
    dwconv_triton.depthwise_conv_wgrad(x, g, 4, interpret=True)
  with pytest.raises(ValueError, match="images > 1 needs one_pass"):
    dwconv_triton.depthwise_conv_wgrad(x, g, k, interpret=True,
                                       tiles=dwconv_triton.WgradTiles(images=2))
  with pytest.raises(ValueError, match="positive multiple of strip"):
    dwconv_triton.depthwise_conv_wgrad(x, g, k, interpret=True,
                                       tiles=dwconv_triton.WgradTiles(columns=True, strip=2,
                                                                      rows=3))
  with pytest.raises(ValueError, match="excludes one_pass"):
    dwconv_triton.depthwise_conv_wgrad(x, g, k, interpret=True,
                                       tiles=dwconv_triton.WgradTiles(columns=True,
                                                                      one_pass=True))


@pytest.mark.parametrize("wgrad", ["xla", "grouped8", "pallas", "pallas_columns"])
def test_pallas_conv_gradients_match_xla(wgrad):
  """depthwise_conv(conv="pallas"): the Pallas forward and its input gradient (the conv with
  mirrored taps) and the chosen weight gradient vs plain XLA autodiff, float32, odd H/W."""
  kx, kw, kg = jax.random.split(jax.random.key(7), 3)
  x = rand.normal(kx, (2, 7, 5, 16))
  w = rand.normal(kw, (7, 7, 16))
  g = rand.normal(kg, (2, 7, 5, 16))
  y, vjp = jax.vjp(lambda a, b: dwconv.depthwise_conv(a, b, wgrad=wgrad, conv="pallas",
                                                      interpret=True), x, w)
  dx, dw = vjp(g)
  y0, dx0, dw0 = _plain_autodiff(x, w, g)
  for got, want in ((y, y0), (dx, dx0), (dw, dw0)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="conv must be"):
    dwconv.depthwise_conv(x, w, conv="cudnn")
  with pytest.raises(ValueError, match='wgrad="pallas" needs conv="pallas"'):
    dwconv.depthwise_conv(x, w, wgrad="pallas")


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 1e-2)])
def test_conv_and_x_adds_both_cotangents(dtype, tol):
  """depthwise_conv_and_x: (conv(x), x); x's gradient = the conv's input gradient plus the
  cotangent of the pass-through, added inside the conv kernel (odd H / W, C=40: a partial
  channel block), vs XLA autodiff of the same function in float32.  A wrong pass-through
  (here: its cotangent dropped or doubled) would fail: that term is as large as the conv's."""
  kx, kw, kg, kr = jax.random.split(jax.random.key(9), 4)
  x = rand.normal(kx, (2, 9, 7, 40)).astype(dtype)
  w = rand.normal(kw, (7, 7, 40)) * 0.1
  gz = rand.normal(kg, x.shape).astype(dtype)
  gx = rand.normal(kr, x.shape).astype(dtype)
  f32 = jnp.float32
  (z, xo), vjp = jax.vjp(lambda a, b: dwconv.depthwise_conv_and_x(a, b, wgrad="pallas",
                                                                  interpret=True), x, w)
  dx, dw = vjp((gz, gx))
  z0, vjp0 = jax.vjp(lambda a, b: dwconv.depthwise_conv(a, b, wgrad="xla"), x.astype(f32), w)
  dx0, dw0 = vjp0(gz.astype(f32))
  np.testing.assert_array_equal(np.asarray(xo), np.asarray(x))
  assert _rel(z, z0) < tol
  assert _rel(dx, dx0 + gx.astype(f32)) < tol
  assert _rel(dw, dw0) < tol
  # with a bias: added to z, and its gradient (gz summed over pixels) from the same pass
  b = rand.normal(kr, (40,)) * 0.5
  (zb, _), vjp_b = jax.vjp(lambda a, b_, c_: dwconv.depthwise_conv_and_x(
      a, b_, c_, wgrad="pallas", interpret=True), x, w, b)
  dxb, dwb, db = vjp_b((gz, gx))
  assert _rel(zb, z0 + b) < tol
  assert _rel(dxb, dx0 + gx.astype(f32)) < tol and _rel(dwb, dw0) < tol
  assert db.shape == b.shape and db.dtype == b.dtype
  assert _rel(db, gz.astype(f32).sum((0, 1, 2))) < 1e-5  # float32 sums of the same values
  with pytest.raises(ValueError, match="kernel must be"):
    dwconv.depthwise_conv_and_x(x, w[:, :, :8])
  with pytest.raises(ValueError, match="bias must be"):
    dwconv.depthwise_conv_and_x(x, w, b[:8])
  from pallas_kernels.convnext_block import dwconv_triton
  with pytest.raises(ValueError, match="residual must have x's shape"):
    dwconv_triton.depthwise_conv(x, w, residual=x[:1], interpret=True)


@pytest.mark.parametrize("tiles", [None, dict(strip=4, tile_w=4, cblock=16),
                                   dict(columns=True, strip=4, rows=8, unroll=3),
                                   dict(columns=True, strip=4, rows=8, prefetch=False)])
def test_pallas_conv_column_sums(tiles):
  """depthwise_conv(col_sums=True): x summed over N, H, W from the programs' partial sums,
  every pixel counted once -- partial strips, column tiles and channel blocks (9 x 7 x 40
  with 4-row strips, 4-wide tiles, 16-channel blocks) -- and the conv unchanged."""
  from pallas_kernels.convnext_block import dwconv_triton
  kx, kw = jax.random.split(jax.random.key(5))
  x = rand.normal(kx, (2, 9, 7, 40))
  w = rand.normal(kw, (7, 7, 40)) * 0.1
  t = None if tiles is None else dwconv_triton.DwconvTiles(**tiles)
  y, sums = dwconv_triton.depthwise_conv(x, w, tiles=t, col_sums=True, interpret=True)
  y0 = dwconv_triton.depthwise_conv(x, w, tiles=t, interpret=True)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
  assert sums.shape == (40,) and sums.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(sums), np.asarray(x).sum((0, 1, 2)), rtol=1e-5,
                             atol=1e-4)


@pytest.mark.gpu
def test_pallas_conv_gradients_compiled_on_gpu():
  """depthwise_conv(conv="pallas") compiled: value, input and kernel gradients vs XLA's
  autodiff in float32 (ConvNeXt-T stage-1 width, stage 4), with the "auto" kernel gradient
  (XLA's / the grouped form) and the Pallas kernels' (the tile and the column-walk forms)."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  for shape in ((2, 56, 56, 96), (4, 7, 7, 768)):
    kx, kw, kg = jax.random.split(jax.random.key(shape[-1]), 3)
    x = rand.normal(kx, shape).astype(jnp.bfloat16)
    w = rand.normal(kw, (7, 7, shape[-1])) * 0.1
    g = rand.normal(kg, shape).astype(jnp.bfloat16)
    y0, dx0, dw0 = _plain_autodiff(x.astype(jnp.float32), w, g.astype(jnp.float32))
    for wgrad in ("auto", "pallas", "pallas_columns"):
      y, vjp = jax.vjp(lambda a, b: dwconv.depthwise_conv(a, b, conv="pallas", wgrad=wgrad),
                       x, w)
      dx, dw = vjp(g)
      for got, want in ((y, y0), (dx, dx0), (dw, dw0)):
        got = jnp.asarray(got, jnp.float32)
        assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) < 1e-2
    # the pass-through form: x's cotangent (here g again) added in the kernel's input pass
    bias = jnp.linspace(-1.0, 1.0, shape[-1])
    (y, _), vjp = jax.vjp(lambda a, b, c: dwconv.depthwise_conv_and_x(a, b, c, wgrad="pallas"),
                          x, w, bias)
    dx, dw, db = vjp((g, g))
    db0 = g.astype(jnp.float32).sum((0, 1, 2))
    for got, want in ((y, y0 + bias), (dx, dx0 + g.astype(jnp.float32)), (dw, dw0),
                      (db, db0)):
      got = jnp.asarray(got, jnp.float32)
      assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) < 1e-2


def test_fma_helper_checks_its_operands():
  """_common.fma: the interpreter's form is a * b + c; mixed dtypes or shapes are refused
  (the inline-PTX form takes float32 registers, one instruction per element)."""
  from pallas_kernels import _common as cm
  a, b, c = (jnp.full((4, 8), v, jnp.float32) for v in (1.5, -2.0, 0.25))
  np.testing.assert_array_equal(np.asarray(cm.fma(a, b, c, fused=False)), -2.75)
  with pytest.raises(ValueError, match="float32"):
    cm.fma(a.astype(jnp.bfloat16), b, c, fused=False)
  with pytest.raises(ValueError, match="one shape"):
    cm.fma(a[:1], b, c, fused=True)


def test_column_walk_conv_residual_and_bad_tiles():
  """The column-walk conv with bias and a residual equals the default kernel's (float32,
  interpreter); its tile checks name the problem."""
  from pallas_kernels.convnext_block import dwconv_triton
  kx, kw, kb, kr = jax.random.split(jax.random.key(11), 4)
  x = rand.normal(kx, (2, 6, 9, 32))
  w = rand.normal(kw, (7, 7, 32)) * 0.1
  b = rand.normal(kb, (32,))
  r = rand.normal(kr, x.shape)
  want = dwconv_triton.depthwise_conv(x, w, b, r, interpret=True)
  for prefetch in (False, True):             # the residual is one of the prefetched loads
    cols = dwconv_triton.DwconvTiles(columns=True, strip=3, rows=3, unroll=2, prefetch=prefetch)
    got = dwconv_triton.depthwise_conv(x, w, b, r, tiles=cols, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  for bad, msg in ((dict(cblock=16), "power of two >= 32"), (dict(strip=2, rows=3),
                                                             "positive multiple of strip")):
    with pytest.raises(ValueError, match=msg):
      dwconv_triton.depthwise_conv(x, w, tiles=dwconv_triton.DwconvTiles(columns=True, **bad),
                                   interpret=True)


def test_default_tiles_follow_the_measured_rule():
  """tiles=None: the column walk with prefetched loads except at 8- to 16-wide images and in
  the interpreter (the tile kernel); the walk's kernel-gradient defaults by channel count."""
  from pallas_kernels.convnext_block import dwconv_triton as dt
  walk = dt.DwconvTiles(columns=True, prefetch=True)
  assert [dt.default_tiles(w) for w in (56, 28, 17, 14, 8, 7)] == [walk] * 3 + [
      dt.DwconvTiles()] * 2 + [walk]
  assert dt.default_tiles(56, interpret=True) == dt.DwconvTiles()
  assert dt.resolve_tiles(56, 56, 96, None).columns
  for c, cblock in ((96, 64), (192, 64), (384, 128), (768, 128)):
    t = dt.resolve_wgrad_tiles(14, 14, c, dt.WgradTiles(columns=True))
    assert (t.cblock, t.num_warps, t.rows, t.prefetch) == (cblock, cblock // 32, 14, True)
